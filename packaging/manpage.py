"""Write the manual page of a click command tree (sparkctl, sparkd) as roff, to stdout.

    PYTHONPATH=STAGED_LIBDIR python3 packaging/manpage.py sparkctl VERSION DATE

packaging/build-deb.sh runs it at build time with the python and the code being packaged,
so the page says what the installed command does: every subcommand with its help text,
arguments and options (click's own help records: defaults and environment variables
included). The sections around them (FILES, ENVIRONMENT, EXIT STATUS, SEE ALSO) are written
here. Output is plain man(7) macros that `man --warnings` (lintian) reads without a word.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator

import click

PROGRAMS = {
    "sparkctl": ("sparkd.ctl.main", "cli"),
    "sparkd": ("sparkd.main", "cli"),
}

SUMMARY = {
    "sparkctl": "control sparkd, the inference engine supervisor",
    "sparkd": "supervisor for LLM inference engines, and the helpers its units run",
}

EXTRA: dict[str, list[tuple[str, str]]] = {
    "sparkctl": [],
    "sparkd": [
        (
            "DESCRIPTION",
            "sparkd is not started by hand: the unit sparkd.service runs "
            "\\fBsparkd daemon\\fR, sparkd-gateway.service runs \\fBsparkd gateway\\fR, and the "
            "engine units that sparkd renders run \\fBsparkd prestart\\fR and "
            "\\fBsparkd wait\\-healthy\\fR. \\fBsparkd check\\-config\\fR is for people: "
            "it checks /etc/sparkd.toml before a reload.",
        ),
    ],
}

COMMON = [
    (
        "FILES",
        ".TP\n/etc/sparkd.toml\nThe configuration: models, engines, memory reserve, gateway.\n"
        ".TP\n/var/lib/sparkd\nState (the desired model), and models/, the model store.\n"
        ".TP\n/run/sparkd/control.sock\nThe control socket sparkctl talks to (root and group "
        "sparkd).",
    ),
    (
        "ENVIRONMENT",
        ".TP\n.B SPARKD_CONFIG\nThe configuration file, when no \\fB\\-\\-config\\fR is given.",
    ),
    (
        "SEE ALSO",
        "\\fBsparkctl\\fR(1), \\fBsparkd\\fR(1), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1); "
        "/usr/share/doc/sparkd/README.md and the other documents beside it.",
    ),
]


def roff(text: str) -> str:
    """Text as roff: backslashes and hyphens escaped, no line starting with a control
    character, click's \\b (no rewrap) markers dropped, paragraphs kept."""
    text = text.split("\f", 1)[0]  # click: everything after \f is not help
    out: list[str] = []
    for line in inspect.cleandoc(text).splitlines():
        if line.strip() == "\b":
            continue
        line = line.replace("\\", "\\e").replace("-", "\\-")
        if not line.strip():
            out.append(".PP")
            continue
        if line[0] in ".'":
            line = "\\&" + line
        out.append(line.strip())
    return "\n".join(out)


def walk(
    command: click.Command, ctx: click.Context, path: list[str]
) -> Iterator[tuple[list[str], click.Command, click.Context]]:
    """Every command below command (depth first, sorted), with its full name."""
    if not isinstance(command, click.Group):
        return
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = click.Context(sub, info_name=name, parent=ctx)
        yield [*path, name], sub, sub_ctx
        yield from walk(sub, sub_ctx, [*path, name])


def exit_statuses() -> str:
    """sparkctl's exit statuses, from the one enum that defines them."""
    from sparkd.ctl.exits import ExitStatus

    return "\n".join(
        f".TP\n{status.value}\n{roff(status.name.lower().replace('_', ' '))}"
        for status in ExitStatus
    )


def options(command: click.Command, ctx: click.Context) -> list[str]:
    lines: list[str] = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_ = record
        lines += [".TP", f"\\fB{roff(names)}\\fR", roff(help_) if help_ else ""]
    return [line for line in lines if line]


def page(program: str, version: str, date: str) -> str:
    module, attr = PROGRAMS[program]
    root: click.Command = getattr(importlib.import_module(module), attr)
    ctx = click.Context(root, info_name=program)
    title = program.upper()
    lines = [
        f'.TH {title} 1 "{date}" "sparkd {roff(version)}" "sparkd manual"',
        ".SH NAME",
        f"{program} \\- {roff(SUMMARY[program])}",
        ".SH SYNOPSIS",
        f".B {program}",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
        roff(root.help or ""),
    ]
    extra = dict(EXTRA.get(program, []))
    if program == "sparkctl":
        extra["EXIT STATUS"] = exit_statuses()
    if "DESCRIPTION" in extra:
        lines += [".PP", extra.pop("DESCRIPTION")]
    lines += [".SH OPTIONS", *options(root, ctx), ".SH COMMANDS"]
    for path, command, sub_ctx in walk(root, ctx, [program]):
        usage = " ".join(roff(piece) for piece in command.collect_usage_pieces(sub_ctx))
        lines += [
            f'.SS "{roff(" ".join(path))}"',
            f".B {roff(' '.join(path))}",
            usage,
            ".PP",
            roff(command.help or command.short_help or ""),
        ]
        opts = options(command, sub_ctx)
        if opts:
            lines += [".PP", "Options:", ".RS", *opts, ".RE"]
    for heading, body in [*extra.items(), *COMMON]:
        lines += [f".SH {heading}", body]
    return "\n".join(line for line in lines if line) + "\n"


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] not in PROGRAMS:
        print(f"usage: manpage.py {{{','.join(PROGRAMS)}}} VERSION DATE", file=sys.stderr)
        return 2
    sys.stdout.write(page(*sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
