"""The `nc-study` command: the subcommands of study/ and analysis/ under one parser.

    train    study.cli      one bare trial (no Ray, no MLflow)
    measure  study.cli      NC metrics of exported features
    run      study.runner   a study on Ray Tune, recorded in MLflow
    status   study.status   where a recorded study stands, from MLflow alone
    analyze  analysis.cli   the thesis' conjectures tested on a recorded study
    recheck  analysis.recheck a published report re-made from its study records alone
    export   study.transfer a recorded study as one file
    import   study.transfer that file into another tracking store

The one module that imports both packages, so neither imports the other's command line:
the console script `nc-study` and `python -m study` start here. The subcommand modules import their heavy dependencies (torch,
Ray, MLflow) only when they run.
"""
from __future__ import annotations

import argparse
import signal

from analysis.cli import add_analyze_parser
from analysis.recheck import add_recheck_parser

from .cli import add_measure_parser, add_train_parser, run_command
from .runner import add_run_parser
from .status import add_status_parser
from .transfer import add_transfer_parsers

DESCRIPTION = ("Neural collapse studies: train one bare trial, measure exported features, run a study "
               "on Ray Tune recorded in MLflow, see where a recorded study stands, analyze it, re-make a "
               "published report from its records, export a study to a file and import it elsewhere. A "
               "mistake a user can fix ends in one line on stderr and exit status 2.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nc-study", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_measure_parser(sub)
    add_run_parser(sub)
    add_status_parser(sub)
    add_analyze_parser(sub)
    add_recheck_parser(sub)
    add_transfer_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A blocked SIGINT is inherited: a command started by a process that blocked it (Ray's own
    # process launcher does, for what it starts) would never see a Ctrl-C, nor Tune's handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return run_command(build_parser(), argv)
