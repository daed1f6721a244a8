"""Platform admins: the demo one `make run` seeds, and the `rr-create-admin` command for real deployments."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys

import asyncpg

from control_plane.passwords import Passwords
from shared.settings import Settings, SettingsError, load_settings

__all__ = ["DEMO_ADMIN_EMAIL", "ensure_platform_admin", "main", "seed_demo_admin"]

DEMO_ADMIN_EMAIL = "admin@rocket-relay.localhost"
MIN_PASSWORD_LENGTH = 10


async def ensure_platform_admin(settings: Settings, email: str, password: str, *,
                                owner_of_org: int | None = None) -> int:
    """Create the user `email` as a platform admin, or make an existing one an admin with this password.
    Optionally also make them an owner of `owner_of_org`. Returns the user id."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    passwords = Passwords(time_cost=settings.password_time_cost, memory_kib=settings.password_memory_kib)
    password_hash = await passwords.hash(password)
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            user_id = await conn.fetchval("select id from users where lower(email) = lower($1) for update", email)
            if user_id is None:
                user_id = await conn.fetchval(
                    """insert into users (email, password_hash, is_platform_admin) values ($1, $2, true)
                       returning id""", email, password_hash)
            else:
                await conn.execute("update users set password_hash = $2, is_platform_admin = true where id = $1",
                                   user_id, password_hash)
            if owner_of_org is not None:
                await conn.execute(
                    """insert into memberships (org_id, user_id, role) values ($1, $2, 'owner')
                       on conflict (org_id, user_id) do update set role = 'owner'""", owner_of_org, user_id)
            await conn.execute(
                """insert into audit_log (actor_role, action, target_type, target_id, changes)
                   values ('system', 'user.make_platform_admin', 'user', $1, '{}')""", str(user_id))
    finally:
        await conn.close()
    return user_id


async def seed_demo_admin(settings: Settings, password: str, demo_org_id: int) -> str:
    """The demo platform admin of `make run` (also owner of the demo org); returns its email."""
    await ensure_platform_admin(settings, DEMO_ADMIN_EMAIL, password, owner_of_org=demo_org_id)
    return DEMO_ADMIN_EMAIL


def main() -> None:
    """`rr-create-admin EMAIL`: create a platform admin (or promote a user), against DATABASE_URL.

    The password comes from `--password-stdin` (first line of standard input) or is asked for twice.
    """
    parser = argparse.ArgumentParser(prog="rr-create-admin", description=main.__doc__)
    parser.add_argument("email")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    args = parser.parse_args()
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"rr-create-admin: {exc}")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            sys.exit("rr-create-admin: the passwords differ")
    try:
        user_id = asyncio.run(ensure_platform_admin(settings, args.email.strip(), password))
    except ValueError as exc:
        sys.exit(f"rr-create-admin: {exc}")
    except (OSError, asyncpg.PostgresError) as exc:
        sys.exit(f"rr-create-admin: {type(exc).__name__}: {exc}")
    print(f"platform admin {args.email.strip()} (user {user_id}) ready", file=sys.stdout)


if __name__ == "__main__":
    main()
