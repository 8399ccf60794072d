"""Every `stamp ... --help` ends with one or two examples that the parser accepts for that command."""

import argparse
import shlex

import pytest

from stamp_dist.cli import build_parser


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for ``stamp`` and every (nested) subcommand."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


ALL = list(parsers(build_parser()))


def test_every_command_is_covered():
    names = {" ".join(path) for path, _ in ALL}
    assert {"", "demo", "bench", "data", "data convert", "data demo", "data info", "pretrain", "meta-train", "prune",
            "finetune", "slurm", "slurm submit"} <= names


@pytest.mark.parametrize("path,parser", ALL, ids=[" ".join(p) or "stamp" for p, _ in ALL])
def test_help_ends_with_examples_that_parse(path, parser):
    help_lines = parser.format_help().rstrip().splitlines()
    start = help_lines.index("examples:")
    examples = help_lines[start + 1:]
    assert 1 <= len(examples) <= 2 and all(line.startswith("  stamp ") for line in examples)
    for line in examples:
        argv = shlex.split(line, comments=True)[1:]
        assert tuple(argv[:len(path)]) == path, f"{line!r} is not an example of `stamp {' '.join(path)}`"
        args = build_parser().parse_args(argv)  # exits (fails the test) on an argument the command lacks
        assert callable(args.handler)
        if parser.get_default("handler") is not None:
            assert args.handler is parser.get_default("handler")
