#!/usr/bin/env python3
"""Judges an Autobahn|Testsuite run of the echo example (autobahn.sh): exit 0 only when
every case of every pass is OK or INFORMATIONAL (UNIMPLEMENTED for the compression cases 12.*
and 13.* in the pass without permessage-deflate, where the server rightly declines it), its
closing behaviour too, and NON-STRICT only for the cases below, where Python `websockets`
17.4 (a known-good server, `../shared/autobahn/baseline.sh`) is NON-STRICT for the same
reason.

usage: autobahn_judge.py RUN_DIR   (the AUTOBAHN_OUT of run.sh: RUN_DIR/<pass>/reports/index.json)
"""
import json
import os
import sys

# 6.4.3 and 6.4.4 send an invalid UTF-8 sequence in the middle of one frame, in chops with
# pauses between them, and want the connection failed before the frame is complete. A server
# that checks text frame by frame (as this one and `websockets` do: the fragment that breaks
# UTF-8 fails the connection, never the message's end) fails it when the frame is whole.
NON_STRICT_AS_WEBSOCKETS = {"6.4.3", "6.4.4"}
ACCEPTED = {"OK", "INFORMATIONAL"}


def judge(run_dir):
    problems = []
    passes = sorted(p for p in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, p)))
    if sorted(passes) != ["deflate", "plain"]:
        problems.append(f"expected the passes plain and deflate, found {passes}")
    for name in passes:
        index = os.path.join(run_dir, name, "reports", "index.json")
        try:
            with open(index, encoding="utf8") as f:
                report = json.load(f)
        except (OSError, ValueError) as err:
            problems.append(f"{name}: no report ({err})")
            continue
        counts = {}
        for agent, cases in report.items():
            for case_id, case in sorted(cases.items(), key=lambda c: [int(x) for x in c[0].split(".")]):
                behavior, closing = case["behavior"], case["behaviorClose"]
                counts[behavior] = counts.get(behavior, 0) + 1
                compression = case_id.split(".")[0] in ("12", "13")
                fine = (
                    behavior in ACCEPTED
                    or (behavior == "UNIMPLEMENTED" and compression and name == "plain")
                    or (behavior == "NON-STRICT" and case_id in NON_STRICT_AS_WEBSOCKETS)
                )
                closing_fine = closing in ACCEPTED or (behavior == "UNIMPLEMENTED" and fine)
                if not (fine and closing_fine):
                    problems.append(
                        f"{name} {case_id}: behavior {behavior}, close {closing} "
                        f"(code {case.get('remoteCloseCode')})"
                    )
            total = sum(counts.values())
            summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            print(f"autobahn {name} ({agent}): {total} cases, {summary}")
    return problems


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    problems = judge(sys.argv[1])
    for problem in problems:
        print(f"autobahn: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print("autobahn: every case OK or INFORMATIONAL, NON-STRICT only where websockets is too")


if __name__ == "__main__":
    main()
