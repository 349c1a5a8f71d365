"""Markets as data: loaders for real and synthetic datasets, a Parquet cache, leave-one-out splits.

``load_dataset(name, ...)`` returns ``{market name: MarketData}``; each market has its own local ID space.
"""

from fedmarket.data.market import MarketData
from fedmarket.data.registry import DATASETS, dataset_info, load_dataset
from fedmarket.data.split import MarketSplit, leave_one_out

__all__ = ["DATASETS", "MarketData", "MarketSplit", "dataset_info", "leave_one_out", "load_dataset"]
