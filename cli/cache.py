"""``kdcache cache ls | info | verify | rm``: look after the stores in a cache."""

from __future__ import annotations

import json

import click

from kdcache.cli.common import cache_option


@click.group("cache")
def cache() -> None:
    """List, inspect, verify and remove teacher stores (and plans no store uses)."""


@cache.command("ls")
@cache_option
def ls(cache: str | None) -> None:
    """List teacher stores with their plan, arch, logits and feature forms, views, size, accuracy and forward
    precision (float32, or amp-bfloat16 / amp-float16 from precompute --amp). Each is checked against its own
    description (its attributes, arrays and plan); a damaged one is listed as such, and the command then ends
    with status 1."""
    from kdcache.errors import StoreError
    from kdcache.pipelines.cache_admin import damaged, list_stores, unused_plans
    from kdcache.store import Cache
    from kdcache.text import human_bytes

    c = Cache.at(cache)
    rows = list_stores(c)
    for plan in unused_plans(c, rows):
        click.echo(f"plan {plan}: no teacher store uses it; `kdcache cache rm {plan}` removes it", err=True)
    if not rows:
        click.echo(f"no teacher stores in {c.root}", err=True)
        return
    click.echo(f"{'teacher':<16}  {'plan':<16}  {'arch':<12} {'features':<12} {'dataset':<13} {'views':>5} {'samples':>8} "
               f"{'size':>10} {'test acc':>8}  {'logits':<12}  {'forward':<12}  state")
    for r in rows:
        acc = f"{r.test_accuracy:.2f}%" if r.test_accuracy is not None else "-"
        click.echo(f"{r.teacher_id:<16}  {r.plan_id:<16}  {r.arch:<12} {r.features:<12} {r.dataset:<13} {r.views:>5} "
                   f"{r.samples:>8} "
                   f"{human_bytes(r.bytes):>10} {acc:>8}  {r.logits:<12}  {r.forward:<12}  {r.state}")
    bad = damaged(rows)
    if len(bad) == 1:
        raise StoreError(bad[0].state.split(": ", 1)[1])
    if bad:
        raise StoreError(f"{len(bad)} of {len(rows)} teacher stores are damaged ({', '.join(r.teacher_id for r in bad)}):"
                         " each one's line above says why and what to do")


@cache.command("info")
@click.argument("teacher_id")
@cache_option
def info(teacher_id: str, cache: str | None) -> None:
    """Show a teacher store's attributes, arrays and plan (TEACHER_ID may be a unique prefix); a store that is not
    what its attributes say is shown all the same, then named (status 1)."""
    from kdcache.errors import StoreError
    from kdcache.pipelines.cache_admin import store_info
    from kdcache.store import Cache

    info = store_info(Cache.at(cache), teacher_id)
    click.echo(json.dumps(info, indent=2, default=str))
    if info["problems"]:
        raise StoreError(info["problems"][0])


@cache.command("verify")
@click.argument("teacher_id", required=False)
@cache_option
def verify(teacher_id: str | None, cache: str | None) -> None:
    """Check one store, or all, against its description, then read every chunk (checksums), every completion
    marker and its plan."""
    from kdcache.errors import StoreError
    from kdcache.pipelines.cache_admin import remedy, verdict, verify_stores
    from kdcache.store import Cache

    c = Cache.at(cache)
    report = verify_stores(c, teacher_id)
    bad = []
    for tid, problems in report.items():
        if problems:
            bad.append(tid)
            click.echo(f"{tid}: {len(problems)} problem(s); {remedy(tid, problems, c)}")
            for p in problems:
                click.echo(f"  {p}")
        else:
            click.echo(f"{tid}: ok")
    if len(bad) == 1:
        raise StoreError(verdict(bad[0], report[bad[0]], c))
    if bad:
        raise StoreError(f"{len(bad)} of {len(report)} stores are unfinished or damaged ({', '.join(bad)}); each one's "
                         "lines above say why and what to do")


@cache.command("rm")
@click.argument("store_id")
@cache_option
def rm(store_id: str, cache: str | None) -> None:
    """Delete a teacher store (its plan stays for other teachers), or a plan that no teacher store uses (`cache
    ls` names them). STORE_ID may be a unique prefix. Refused while a process writes or reads it."""
    from kdcache.pipelines.cache_admin import remove
    from kdcache.store import Cache

    kind, removed = remove(Cache.at(cache), store_id)
    click.echo(f"removed {'plan ' if kind == 'plan' else ''}{removed}")
