"""Master key rotation: every secret re-wrapped under the new key while old ones keep opening meanwhile."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys

import asyncpg
import msgspec
import pytest

from shared.crypto import DecryptionError, SecretBox, box_from_settings, load_secret, store_secret
from shared.db.migrate import migrate
from tests.conftest import ROOT, settings_env
from tests.shared.test_migrate import empty_db  # noqa: F401  (fixture)


async def test_rotation_rewraps_everything_without_downtime(empty_db: str, settings) -> None:  # noqa: F811
    await migrate(empty_db)
    old = msgspec.structs.replace(settings, database_url=empty_db)
    new_key = base64.b64encode(os.urandom(32)).decode()
    new = msgspec.structs.replace(old, master_key=new_key, master_key_id="k2",
                                  old_master_keys=f"{old.master_key_id}:{old.master_key}")
    pool = await asyncpg.create_pool(empty_db, min_size=1, max_size=2)
    try:
        old_box = box_from_settings(old.master_key_bytes, old.master_key_id)
        ids = [await store_secret(pool, old_box, "byok_credential", f"sk-secret-{i}") for i in range(7)]
        during = box_from_settings(new.master_key_bytes, new.master_key_id, new.old_master_keys_map)
        assert await load_secret(pool, during, ids[0]) == "sk-secret-0"  # old rows open during the rotation

        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", "from shared.crypto import rotate_main; rotate_main()"],
            env=settings_env(new), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "re-wrapped 7 secret(s) under master key k2" in result.stdout
        assert "sk-secret" not in result.stdout + result.stderr

        assert {r["master_key_id"] for r in await pool.fetch("select master_key_id from secrets")} == {"k2"}
        only_new = SecretBox({"k2": new.master_key_bytes}, "k2")
        assert [await load_secret(pool, only_new, i) for i in ids] == [f"sk-secret-{i}" for i in range(7)]
        with pytest.raises(DecryptionError):
            await load_secret(pool, old_box, ids[0])  # the old key alone no longer opens them

        again = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", "from shared.crypto import rotate_main; rotate_main()"],
            env=settings_env(new), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert "re-wrapped 0 secret(s)" in again.stdout
    finally:
        await pool.close()


def test_malformed_old_master_keys_are_refused(settings) -> None:
    from shared.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="RR_OLD_MASTER_KEYS"):
        load_settings({}, **{**{f: getattr(settings, f) for f in settings.__struct_fields__},
                             "old_master_keys": "k0:c2hvcnQ="})
