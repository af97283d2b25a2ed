"""`sparkctl rewrite --model NAME FILE`: what the gateway makes of a request's messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from sparkd.config import load_config
from sparkd.ctl.exits import run
from sparkd.errors import SparkdError
from sparkd.options import config_option


@click.command()
@config_option
@click.option("--model", "model_name", required=True, metavar="NAME",
              help="The configured model whose role_policy applies.")
@click.argument("request_file", metavar="FILE", type=click.File("r", encoding="utf-8"))
@click.pass_context
def rewrite(ctx: click.Context, config_file: Path, model_name: str, request_file: Any) -> None:
    """Show what the gateway makes of a chat request for a model (FILE: a request body or a
    list of messages, - for stdin). No daemon needed.

    The rewritten request goes to stdout; the policy, the changes and the roles before and
    after to stderr.
    """

    def go() -> None:
        from sparkd.gateway.rewrite import resolve_policy
        from sparkd.gateway.rewrite import rewrite as apply_policy

        config = load_config(config_file)
        model = config.model(model_name)
        try:
            body = json.load(request_file)
        except ValueError as exc:
            raise SparkdError(f"{request_file.name}: not JSON: {exc}") from None
        request = body if isinstance(body, dict) else {"messages": body}
        messages = request.get("messages")
        if not isinstance(messages, list):
            raise SparkdError(f"{request_file.name}: expected a request with messages, "
                              "or a list of messages")
        choice = resolve_policy(model.role_policy, model.name, model.source, str(model.path))
        result = apply_policy(messages, choice)
        shown = model.role_policy if model.role_policy == choice.policy else (
            f"{model.role_policy} -> {choice.policy}")
        click.echo(f"policy {shown}: {result.changes} change(s)", err=True)
        click.echo(f"  roles before: {' '.join(result.roles_before) or '(none)'}", err=True)
        click.echo(f"  roles after:  {' '.join(result.roles_after) or '(none)'}", err=True)
        for note in result.notes:
            click.echo(f"  - {note}", err=True)
        out = {**request, "messages": result.messages} if isinstance(body, dict) else (
            result.messages)
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))

    run(ctx, go)
