"""Sealing task config: round trip, key rotation, and refusals that name what is wrong."""
from __future__ import annotations

import pytest

from taskd.db.sealing import MARK, SealError, Sealer, is_sealed, key_id, load_keys, new_key


def keys(n: int) -> list[bytes]:
    return [bytes.fromhex(new_key()) for _ in range(n)]


def test_seal_round_trip_holds_no_value_in_clear():
    sealer = Sealer(keys(1))
    config = {"/raintank/apps/ns1": {"apiKey": "SECRET-123", "zone": "example.com", "n": 2}}
    sealed = sealer.seal(config)
    assert is_sealed(sealed) and "SECRET-123" not in sealed[MARK] and "example.com" not in sealed[MARK]
    assert sealer.open(sealed[MARK]) == config
    assert sealer.seal(config) != sealed  # a fresh nonce each time


def test_the_first_key_seals_and_every_key_opens():
    old, new = keys(2)
    sealed_old = Sealer([old]).seal({"a": 1})
    rotated = Sealer([new, old])
    assert rotated.open(sealed_old[MARK]) == {"a": 1}
    assert rotated.seal({"a": 1})[MARK].split(":")[1] == key_id(new)


def test_a_missing_key_is_named_by_its_id_never_the_key():
    gone, kept = keys(2)
    sealed = Sealer([gone]).seal({"a": 1})
    with pytest.raises(SealError, match=key_id(gone)) as info:
        Sealer([kept]).open(sealed[MARK])
    assert gone.hex() not in str(info.value)


def test_an_altered_value_does_not_open():
    sealer = Sealer(keys(1))
    version, kid, blob = sealer.seal({"a": 1})[MARK].split(":")
    flipped = blob[:-4] + ("AAAA" if blob[-4:] != "AAAA" else "BBBB")
    with pytest.raises(SealError, match="does not decrypt"):
        sealer.open(f"{version}:{kid}:{flipped}")


def test_key_files_one_key_per_line_hex_or_base64_comments_skipped(tmp_path):
    import base64
    a, b = keys(2)
    path = tmp_path / "db.key"
    path.write_text(f"# taskd key file\n{a.hex()}\n\n{base64.b64encode(b).decode()}\n")
    assert load_keys([str(path)]) == [a, b]


@pytest.mark.parametrize("text, words", [
    ("not-a-key\n", "line 1"), ("abcd\n", "32 bytes"), ("# only a comment\n", "no key found"),
])
def test_bad_key_files_are_refused_naming_the_file(tmp_path, text, words):
    path = tmp_path / "db.key"
    path.write_text(text)
    with pytest.raises(SealError, match=words) as info:
        load_keys([str(path)])
    assert str(path) in str(info.value)


def test_an_unreadable_key_file_is_named(tmp_path):
    with pytest.raises(SealError, match="missing.key"):
        load_keys([str(tmp_path / "missing.key")])
