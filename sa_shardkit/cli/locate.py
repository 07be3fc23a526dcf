"""`shardkit locate KEY`: which shard owns a key, by the same ring lookup the application uses."""

from __future__ import annotations

import uuid

import click

from ..rebalance import load_ring_state
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
@click.option(
    "--offline", is_flag=True, help="Use the configured ring; do not read the ring version the shards store."
)
def locate(
    config_path: str | None, urls: tuple[str, ...], keys: tuple[str, ...], as_type: str, offline: bool
) -> None:
    """Print the shard that owns each KEY and the ring version it was looked up on.

    The ring the shards store (``shardkit rebalance``) wins over the configured one: after a
    rebalance that is the ring the application routes by. During a move, a moving key shows both
    shards.
    """
    with load_manager(config_path, urls) as manager:
        state = None if offline else load_ring_state(manager)
        for raw in keys:
            key = parse_key(raw, as_type)
            if state is None:
                shard_id = manager.shard_for(key)
                where = f"configured ring {ring_fingerprint(manager.ring)}, no stored ring version"
            else:
                shard_id = state.owner(key)
                where = f"ring version {state.version}"
                move = state.move_of(key)
                if move is not None:
                    shard_id = f"{move[0]} (moving to {move[1]})"
            click.echo(f"{raw}\t{shard_id}\t({where}; hash {key_hash(key):#018x})")
