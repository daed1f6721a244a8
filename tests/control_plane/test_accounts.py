"""Accounts: signup, login, refresh rotation and reuse detection, logout, password change, login limits."""

from __future__ import annotations

import asyncio
import json
import secrets

import jwt

from tests.control_plane.conftest import PASSWORD, Portal, random_ip


async def test_signup_creates_user_org_and_owner_membership(portal: Portal, db) -> None:
    account = await portal.signup(org_name="Ünïcode & Co. — Ltd")
    me = await portal.request("GET", "/v1/me", account)
    assert me.status_code == 200
    body = me.json()
    assert body["email"] == account.email and body["is_platform_admin"] is False
    [membership] = body["memberships"]
    assert membership["org_id"] == account.org_id and membership["role"] == "owner"
    assert membership["org_code"].startswith("unicode-co-ltd-")
    row = await db.fetchrow("select password_hash from users where id = $1", account.user_id)
    assert row["password_hash"].startswith("$argon2id$") and PASSWORD not in row["password_hash"]
    assert await db.fetchval("select balance_micros from org_balances where org_id = $1", account.org_id) == 0


async def test_signup_twice_with_one_email_conflicts(portal: Portal) -> None:
    account = await portal.signup()
    resp = await portal.request("POST", "/v1/auth/signup",
                                json={"email": account.email.upper(), "password": PASSWORD, "org_name": "Again"})
    assert resp.status_code == 409
    assert resp.json() == {"error": {"code": "email_taken", "message": "An account with this email already exists."}}


async def test_signup_validation_is_422_in_the_error_shape(portal: Portal) -> None:
    resp = await portal.request("POST", "/v1/auth/signup",
                                json={"email": "x@y.z", "password": "short", "org_name": "A"})
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "invalid_request" and "password" in error["message"]
    bad_json = await portal.request("POST", "/v1/auth/signup", content=b"{not json",
                                    headers={"content-type": "application/json"})
    # Not JSON at all: a malformed request (400), in the same shape.
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "bad_request"


async def test_access_token_is_a_short_lived_jwt(portal: Portal, settings) -> None:
    account = await portal.signup()
    claims = jwt.decode(account.access_token, options={"verify_signature": False})
    assert claims["sub"] == str(account.user_id) and claims["exp"] - claims["iat"] == settings.access_token_ttl_s
    forged = jwt.encode({**claims, "sub": "1"}, "not the key, but long enough for HS256", algorithm="HS256")
    resp = await portal.http.get(portal.url + "/v1/me", headers={"authorization": f"Bearer {forged}"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    none_alg = jwt.encode(claims, None, algorithm="none")
    resp = await portal.http.get(portal.url + "/v1/me", headers={"authorization": f"Bearer {none_alg}"})
    assert resp.status_code == 401


async def test_refresh_rotates_and_reuse_ends_the_whole_family(portal: Portal) -> None:
    account = await portal.signup()
    first = account.refresh_token
    resp = await portal.request("POST", "/v1/auth/refresh", json={"refresh_token": first})
    assert resp.status_code == 200, resp.text
    second = resp.json()
    assert second["refresh_token"] != first
    resp = await portal.request("POST", "/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert resp.status_code == 200
    third = resp.json()
    # The newest access token works; so does the first one (same family, not yet expired).
    for token in (third["access_token"], account.access_token):
        resp = await portal.http.get(portal.url + "/v1/me", headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 200

    # A thief replays the first (rotated) refresh token: the whole family ends.
    resp = await portal.request("POST", "/v1/auth/refresh", json={"refresh_token": first})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "refresh_token_reused"
    resp = await portal.request("POST", "/v1/auth/refresh", json={"refresh_token": third["refresh_token"]})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_refresh_token"
    for token in (third["access_token"], account.access_token):
        resp = await portal.http.get(portal.url + "/v1/me", headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "session_ended"

    # Other sessions of the same user are not affected.
    other = await portal.login_account(account)
    assert (await portal.request("GET", "/v1/me", other)).status_code == 200


async def test_concurrent_refresh_with_one_token_succeeds_at_most_once(portal: Portal) -> None:
    account = await portal.signup()
    replies = await asyncio.gather(*[
        portal.request("POST", "/v1/auth/refresh", json={"refresh_token": account.refresh_token}) for _ in range(8)])
    assert sorted(r.status_code for r in replies).count(200) == 1


async def test_garbage_refresh_tokens_are_401(portal: Portal) -> None:
    for token in ("", "x", "a.b", "." * 50, secrets.token_urlsafe(16) + "." + secrets.token_urlsafe(32)):
        resp = await portal.request("POST", "/v1/auth/refresh", json={"refresh_token": token})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_refresh_token"


async def test_logout_ends_access_and_refresh_tokens_of_that_session(portal: Portal) -> None:
    account = await portal.signup()
    other = await portal.login_account(account)
    assert (await portal.request("POST", "/v1/auth/logout", account)).status_code == 204
    assert (await portal.request("GET", "/v1/me", account)).status_code == 401
    resp = await portal.request("POST", "/v1/auth/refresh", json={"refresh_token": account.refresh_token})
    assert resp.status_code == 401
    assert (await portal.request("GET", "/v1/me", other)).status_code == 200


async def test_password_change_ends_other_sessions(portal: Portal) -> None:
    account = await portal.signup()
    other = await portal.login_account(account)
    wrong = await portal.request("POST", "/v1/auth/password", account,
                                 json={"current_password": "nope nope nope", "new_password": "a new password!"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_credentials"
    resp = await portal.request("POST", "/v1/auth/password", account,
                                json={"current_password": PASSWORD, "new_password": "a new password!"})
    assert resp.status_code == 204
    assert (await portal.request("GET", "/v1/me", account)).status_code == 200
    assert (await portal.request("GET", "/v1/me", other)).status_code == 401
    assert (await portal.login(account.email, PASSWORD)).status_code == 401
    assert (await portal.login(account.email, "a new password!")).status_code == 200


async def test_unknown_email_and_wrong_password_get_identical_answers(portal: Portal) -> None:
    account = await portal.signup()
    wrong_password = await portal.login(account.email, "wrong password 123")
    unknown_email = await portal.login(f"nobody-{secrets.token_hex(4)}@example.com", "wrong password 123")
    assert wrong_password.status_code == unknown_email.status_code == 401
    assert wrong_password.content == unknown_email.content
    assert wrong_password.json() == {
        "error": {"code": "invalid_credentials", "message": "Incorrect email or password."}}
    assert dict(wrong_password.headers).keys() == dict(unknown_email.headers).keys()
    # Emails are case-insensitive.
    assert (await portal.login(account.email.upper())).status_code == 200


async def test_login_failures_are_limited_per_address_and_email(portal: Portal) -> None:
    account = await portal.signup()
    attacker = random_ip()
    limit = 5  # login_max_failures_per_ip_email in CONTROL_PLANE_OVERRIDES
    for _ in range(limit):
        assert (await portal.login(account.email, "wrong password 123", ip=attacker)).status_code == 401
    # That address is blocked for that email, even with the right password, until the window passes...
    blocked = await portal.login(account.email, PASSWORD, ip=attacker)
    assert blocked.status_code == 429 and blocked.json()["error"]["code"] == "too_many_attempts"
    assert 0 < int(blocked.headers["retry-after"]) <= 60
    # ... while the owner, from elsewhere, logs in.
    assert (await portal.login(account.email, PASSWORD, ip=random_ip())).status_code == 200
    # An unknown email is limited exactly the same way: the limiter reveals nothing either.
    unknown, attacker = f"nobody-{secrets.token_hex(4)}@example.com", random_ip()
    for _ in range(limit):
        assert (await portal.login(unknown, "wrong password 123", ip=attacker)).status_code == 401
    blocked_unknown = await portal.login(unknown, PASSWORD, ip=attacker)
    assert blocked_unknown.status_code == 429 and blocked_unknown.content == blocked.content
    assert _comparable(blocked_unknown.headers) == _comparable(blocked.headers)


def _comparable(headers) -> dict[str, str]:
    # Date and Retry-After tick with the clock; their presence is compared, not their values.
    return {k: ("…" if k in ("date", "retry-after") else v) for k, v in headers.items()}


async def test_attackers_elsewhere_cannot_lock_the_owner_out(portal: Portal) -> None:
    victim = await portal.signup()
    attackers = [random_ip() for _ in range(3)]
    # 12 failures from three addresses (each under its own limit of 5): login_max_failures_per_email.
    for ip in attackers:
        for _ in range(4):
            assert (await portal.login(victim.email, "wrong password 123", ip=ip)).status_code == 401
    # Every attacking address is now throttled for this email, and a new one gets a single guess.
    for ip in attackers:
        assert (await portal.login(victim.email, "wrong password 123", ip=ip)).status_code == 429
    fresh = random_ip()
    assert (await portal.login(victim.email, "wrong password 123", ip=fresh)).status_code == 401
    assert (await portal.login(victim.email, "wrong password 123", ip=fresh)).status_code == 429
    # The owner, from an address with no failures, logs in with the right password.
    assert (await portal.login(victim.email, PASSWORD, ip=random_ip())).status_code == 200
    # An unknown email under the same attack (from other addresses: each is limited across emails too)
    # answers exactly the same.
    unknown, others = f"nobody-{secrets.token_hex(4)}@example.com", [random_ip() for _ in range(3)]
    for ip in others:
        for _ in range(4):
            assert (await portal.login(unknown, "wrong password 123", ip=ip)).status_code == 401
    known = await portal.login(victim.email, "wrong password 123", ip=attackers[0])
    unknown_resp = await portal.login(unknown, "wrong password 123", ip=others[0])
    assert known.status_code == unknown_resp.status_code == 429
    assert known.content == unknown_resp.content
    assert _comparable(known.headers) == _comparable(unknown_resp.headers)
    known = await portal.login(victim.email, "wrong password 123", ip=random_ip())
    unknown_resp = await portal.login(unknown, "wrong password 123", ip=random_ip())
    assert known.status_code == unknown_resp.status_code == 401 and known.content == unknown_resp.content
    assert _comparable(known.headers) == _comparable(unknown_resp.headers)


async def test_login_failures_are_limited_per_ip(portal: Portal) -> None:
    ip = random_ip()
    limit = 8  # login_max_failures_per_ip in CONTROL_PLANE_OVERRIDES
    for i in range(limit):
        resp = await portal.login(f"spray-{i}-{secrets.token_hex(3)}@example.com", "guess guess 1", ip=ip)
        assert resp.status_code == 401
    victim = await portal.signup()
    assert (await portal.login(victim.email, PASSWORD, ip=ip)).status_code == 429
    assert (await portal.login(victim.email, PASSWORD, ip=random_ip())).status_code == 200


async def test_successful_login_resets_the_address_counter(portal: Portal) -> None:
    account = await portal.signup()
    ip = random_ip()
    for _ in range(3):
        assert (await portal.login(account.email, "wrong password 123", ip=ip)).status_code == 401
    assert (await portal.login(account.email, ip=ip)).status_code == 200
    for _ in range(3):
        assert (await portal.login(account.email, "wrong password 123", ip=ip)).status_code == 401
    assert (await portal.login(account.email, ip=ip)).status_code == 200


async def test_refresh_sessions_live_in_redis_under_the_prefix(portal: Portal, redis, settings) -> None:
    account = await portal.signup()
    family = account.refresh_token.split(".")[0]
    key = f"{settings.redis_prefix}cp:sess:{family}"
    stored = await redis.hgetall(key)
    assert stored[b"user"] == str(account.user_id).encode()
    assert account.refresh_token.split(".")[1].encode() not in b"".join(stored.values())  # only hashes
    assert 0 < await redis.ttl(key) <= settings.refresh_token_ttl_s


async def test_password_change_is_audited_without_the_password(portal: Portal, db) -> None:
    account = await portal.signup()
    resp = await portal.request("POST", "/v1/auth/password", account,
                                json={"current_password": PASSWORD, "new_password": "another password"})
    assert resp.status_code == 204
    row = await db.fetchrow("select * from audit_log where action = 'user.password_change' and actor_user_id = $1",
                            account.user_id)
    assert json.loads(row["changes"]) == {"password": {"before": "[redacted]", "after": "[redacted]"}}
    assert row["actor_role"] == "user" and row["ip"] is not None
