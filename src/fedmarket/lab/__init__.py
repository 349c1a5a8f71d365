"""The research workflow ("the lab"), kept apart from the product: run-folder housekeeping (`runs`: merge seeds,
first phase, archive, restore), the job pool that runs grids of configs × seeds as parallel processes (`grid`),
and the helpers of the comparison summaries under ``scripts/`` (`summary`).

The product (``fedmarket.api``, ``fedmarket.report``, the methods, serving) never imports the lab; the lab builds
on the product. The ``fedmarket grid|merge|first-phase|archive|restore`` commands import it when they run.
"""
