#!/usr/bin/env python
"""Accuracy of a prediction csv (image_name,label, as hw2_dann.sh writes) against a label csv.

    python scripts/evaluate_labels.py --pred OUT/usps_pred.csv --labels usps_labels.csv [--json acc.json]

Scores the images both files list; prints `accuracy <value>` and, with --json, writes
{pred, labels, correct, total, accuracy, missing} (missing: labelled images with no prediction).
"""
from __future__ import annotations

import argparse
import json
import sys

from common.config import HelpFormatter
from common.datasets import read_label_csv
from common.errors import UserError, cli_main
from common.fileio import write_text_atomic


@cli_main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--pred", required=True, help="predictions: image_name,label csv")
    p.add_argument("--labels", required=True, help="the true labels: image_name,label csv")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    pred = dict(read_label_csv(args.pred))
    truth = dict(read_label_csv(args.labels))
    common = [n for n in truth if n in pred]
    if not common:
        raise UserError(f"{args.pred}: names no image of {args.labels}")
    correct = sum(pred[n] == truth[n] for n in common)
    report = {"pred": args.pred, "labels": args.labels, "correct": correct, "total": len(common),
              "accuracy": correct / len(common), "missing": len(truth) - len(common)}
    print(f"{correct}/{len(common)} correct; accuracy {report['accuracy']:.4f}")
    if report["missing"]:  # the accuracy is over the images both files list: say how many it left out
        print(f"note: {report['missing']} of the {len(truth)} images in {args.labels} have no prediction in "
              f"{args.pred} and are not scored", file=sys.stderr)
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
