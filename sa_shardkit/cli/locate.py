"""`shardkit locate KEY`: which shard owns a key, by the same ring lookup the application uses."""

from __future__ import annotations

import uuid

import click

from ..ring import ShardKey, key_hash
from .options import config_options, load_manager
from .ring import ring_fingerprint


def parse_key(raw: str, as_type: str) -> ShardKey:
    """The key as the application holds it: ``int`` keys hash as their decimal text, like ``"42"``."""
    if as_type == "uuid":
        try:
            return uuid.UUID(raw)
        except ValueError:
            raise click.BadParameter(f"{raw!r} is not a UUID", param_hint="KEY") from None
    return raw


@click.command()
@config_options
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@click.option(
    "--type",
    "as_type",
    type=click.Choice(["text", "uuid"]),
    default="text",
    show_default=True,
    help="How to read KEY (ints and their text are the same key).",
)
def locate(config_path: str | None, urls: tuple[str, ...], keys: tuple[str, ...], as_type: str) -> None:
    """Print the shard that owns each KEY, with the ring it was looked up on."""
    with load_manager(config_path, urls) as manager:
        fingerprint = ring_fingerprint(manager.ring)
        for raw in keys:
            key = parse_key(raw, as_type)
            shard_id = manager.shard_for(key)
            click.echo(f"{raw}\t{shard_id}\t(hash {key_hash(key):#018x}, ring {fingerprint})")
