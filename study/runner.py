"""Placeholder: the Ray Tune study runner (`nc-study run`)."""


def add_run_parser(sub) -> None:
    pass
