"""`inferq users add|list|remove|logout` and `inferq keys create|list|revoke`.

These talk to NATS directly (`--nats URL`, else `INFERQ_NATS_URL`, else the embedded server a local
`inferq serve` is running), not to the admin API: that is how the first admin key or user is made on a server
whose auth is already on, and it needs no running API. The same operations back the admin routes
(api/auth/accounts.py). A new key is printed alone on stdout (`KEY=$(inferq keys create ci)`); everything
else people read goes to stdout as a table, notes to stderr."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from api.auth.accounts import Accounts, resolve_limits
from api.auth.gate import default_limits
from api.errors import ApiError
from broker.accounts import AccountStore
from broker.connection import NatsAuth, connect
from broker.embedded import running_server_url
from broker.rate_limits import RateLimiter
from common.settings import Settings
from contracts import ErrorCode
from contracts.accounts import RateLimits, Role

_LIMIT_FLAGS = (("--rpm", "requests_per_minute"), ("--tpm", "tokens_per_minute"), ("--rpd", "requests_per_day"))


def _limit(text: str) -> int | None:
    if text.lower() in ("unlimited", "none"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is a positive number or 'unlimited'")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--nats",
        dest="nats_url",
        metavar="URL",
        help="NATS server (default: INFERQ_NATS_URL, else a local `inferq serve`'s embedded one)",
    )
    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument("--role", type=Role, choices=list(Role), default=Role.CLIENT)
    for flag, field in _LIMIT_FLAGS:
        limits.add_argument(
            flag,
            dest=field,
            type=_limit,
            default=argparse.SUPPRESS,
            metavar="N|unlimited",
            help=f"{field.replace('_', ' ')} (default: the server's)",
        )

    parser = argparse.ArgumentParser(prog="inferq", description="Manage users and API keys (stored in NATS).")
    groups = parser.add_subparsers(dest="group", required=True)
    users = groups.add_parser("users", help="people who log in with email and password").add_subparsers(
        dest="action", required=True
    )
    add = users.add_parser(
        "add", parents=[common, limits], help="add a user (password read from the terminal, or --password-stdin)"
    )
    add.add_argument("email")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    users.add_parser("list", parents=[common], help="list users")
    users.add_parser("remove", parents=[common], help="remove a user and revoke their login tokens").add_argument(
        "email"
    )
    users.add_parser("logout", parents=[common], help="revoke every login token of a user").add_argument("email")

    keys = groups.add_parser("keys", help="API keys for programs").add_subparsers(dest="action", required=True)
    keys.add_parser("create", parents=[common, limits], help="create a key; it is printed once").add_argument("name")
    keys.add_parser("list", parents=[common], help="list keys (never their secrets)")
    keys.add_parser("revoke", parents=[common], help="revoke a key by id").add_argument("key_id")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    settings = Settings(**({"nats_url": args.nats_url} if args.nats_url else {}))
    url = settings.nats_url or running_server_url(settings.nats_store_dir)
    if url is None:
        sys.stderr.write("inferq: no NATS server: pass --nats URL or set INFERQ_NATS_URL\n")
        return 2
    try:
        return asyncio.run(_run(args, settings, url))
    except ApiError as exc:
        sys.stderr.write(f"inferq: {exc.info.message}\n")
        return 1


async def _run(args: argparse.Namespace, settings: Settings, url: str) -> int:
    async with connect(url, name="inferq-cli", auth=NatsAuth.from_settings(settings)) as nc:
        js = nc.jetstream()
        defaults = default_limits(settings)
        accounts = Accounts(
            await AccountStore.open(js, settings.nats_replicas),
            await RateLimiter.open(js, settings.nats_replicas),
            defaults,
            settings.login_token_ttl_s,
        )
        return await _ACTIONS[(args.group, args.action)](accounts, args)


def _given_limits(args: argparse.Namespace, defaults: RateLimits) -> RateLimits | None:
    given = {field: getattr(args, field) for _, field in _LIMIT_FLAGS if hasattr(args, field)}
    return resolve_limits(defaults, given) if given else None


def _limits_text(limits: RateLimits | None) -> str:
    if limits is None:
        return "default"
    values = (limits.requests_per_minute, limits.tokens_per_minute, limits.requests_per_day)
    return "/".join("∞" if value is None else str(value) for value in values) + " (rpm/tpm/rpd)"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        sys.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ApiError(ErrorCode.INVALID_REQUEST, "the passwords differ")
    return first


async def _users_add(accounts: Accounts, args: argparse.Namespace) -> int:
    password = _read_password(args.password_stdin)
    user = await accounts.add_user(args.email, password, args.role, _given_limits(args, accounts.defaults))
    sys.stdout.write(f"added {user.email} ({user.role.value})\n")
    return 0


async def _users_list(accounts: Accounts, _: argparse.Namespace) -> int:
    users = sorted(await accounts.store.list_users(), key=lambda user: user.email)
    _table(
        [[u.email, u.role.value, _limits_text(u.limits), _date(u.created_at)] for u in users],
        ["EMAIL", "ROLE", "LIMITS", "CREATED"],
    )
    return 0


def _done(found: bool, what: str, verb: str) -> int:
    if not found:
        sys.stderr.write(f"inferq: no {what}\n")
        return 1
    sys.stdout.write(f"{verb} {what}\n")
    return 0


async def _users_remove(accounts: Accounts, args: argparse.Namespace) -> int:
    return _done(await accounts.remove_user(args.email), f"user {args.email}", "removed")


async def _users_logout(accounts: Accounts, args: argparse.Namespace) -> int:
    sys.stdout.write(f"revoked {await accounts.revoke_tokens(args.email)} login token(s) of {args.email}\n")
    return 0


async def _keys_create(accounts: Accounts, args: argparse.Namespace) -> int:
    record, key = await accounts.create_key(args.name, args.role, _given_limits(args, accounts.defaults))
    sys.stderr.write(f"created key {record.key_id} ({record.name}, {record.role.value}); it is shown only now:\n")
    sys.stdout.write(key + "\n")
    return 0


async def _keys_list(accounts: Accounts, _: argparse.Namespace) -> int:
    keys = sorted(await accounts.store.list_keys(), key=lambda key: key.created_at)
    _table(
        [[k.key_id, k.name, k.role.value, _limits_text(k.limits), _date(k.created_at)] for k in keys],
        ["ID", "NAME", "ROLE", "LIMITS", "CREATED"],
    )
    return 0


async def _keys_revoke(accounts: Accounts, args: argparse.Namespace) -> int:
    return _done(await accounts.revoke_key(args.key_id), f"key {args.key_id}", "revoked")


_ACTIONS = {
    ("users", "add"): _users_add,
    ("users", "list"): _users_list,
    ("users", "remove"): _users_remove,
    ("users", "logout"): _users_logout,
    ("keys", "create"): _keys_create,
    ("keys", "list"): _keys_list,
    ("keys", "revoke"): _keys_revoke,
}
