"""Regenerate the "Measured" part of docs/onboarding.md from the committed onboarding cells.

    .venv/bin/python scripts/onboarding_page.py [--studies results/onboard] [--page docs/onboarding.md]

Each folder under --studies is one `fedmarket onboard` study whose `cells/` and `plan.json` are committed;
its report (tables, verdicts, curve) is rewritten from the cells, the curve copied to
docs/onboarding_<study>.png, and the page's text after its "## Measured" heading replaced by every study's
report.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fedmarket.onboard import write_report

MARKER = "## Measured"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", default="results/onboard")
    ap.add_argument("--page", default="docs/onboarding.md")
    args = ap.parse_args()
    page = Path(args.page)
    head = page.read_text().split(MARKER)[0] + MARKER + "\n"
    parts = []
    for study in sorted(p for p in Path(args.studies).iterdir() if (p / "cells").is_dir()):
        report = write_report(study)
        plan = json.loads((study / "plan.json").read_text())
        cfg = plan["config"]
        png = page.parent / f"onboarding_{study.name}.png"
        shutil.copyfile(study / "onboard.png", png)
        body = report.read_text().split("\n", 1)[1]  # without its own title
        body = body.replace("\n## Newcomer", "\n#### Newcomer")
        command = (
            f"fedmarket onboard configs/{cfg['name']}.yaml --market {' '.join(plan['newcomers'])} "
            f"--seed {' '.join(map(str, plan['seeds']))} --rounds {plan['rounds']} "
            f"--join-round {plan['join_round']} --out {study}"
        )
        parts.append(
            f"\n### {study.name}: `{cfg['method']['name']}` {cfg['model']['name']} on `{cfg['dataset']['name']}`"
            f" ({', '.join(cfg['dataset'].get('markets') or []) or 'all markets'})\n\n"
            f"```bash\n{command}\n```\n\n![{study.name}]({png.name})\n{body}"
        )
    page.write_text(head + "".join(parts))
    print(f"written {page}")


if __name__ == "__main__":
    main()
