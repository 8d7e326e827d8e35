from __future__ import annotations

import base64
import hashlib
import random
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.requirements import require_binary
from uploader import nixbase32

ABC_NIX32 = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
# sha256 of the 120-byte NAR of a single file containing "hello\n".
HELLO_NAR_SHA256_HEX = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
HELLO_NAR_HASH = "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"

digests = st.binary(min_size=32, max_size=32)


def notations(digest: bytes) -> list[str]:
    b64 = base64.b64encode(digest).decode()
    return [
        "sha256:" + nixbase32.encode(digest),
        "sha256:" + digest.hex(),
        "sha256:" + digest.hex().upper(),
        "sha256:" + b64,
        "sha256-" + b64,
    ]


def test_sha256_of_abc_matches_nix() -> None:
    assert nixbase32.encode(hashlib.sha256(b"abc").digest()) == ABC_NIX32


def test_hello_nar_hash_matches_nix() -> None:
    assert nixbase32.format_hash(bytes.fromhex(HELLO_NAR_SHA256_HEX)) == HELLO_NAR_HASH


@pytest.mark.parametrize(("size", "length"), [(32, 52), (20, 32), (1, 2), (0, 0)])
def test_encoded_lengths(size: int, length: int) -> None:
    assert len(nixbase32.encode(bytes(size))) == length
    assert nixbase32.encoded_length(size) == length


def test_alphabet_omits_e_o_u_t() -> None:
    assert len(nixbase32.ALPHABET) == 32
    assert not set("eout") & set(nixbase32.ALPHABET)


@given(st.binary(max_size=80))
def test_decode_inverts_encode(data: bytes) -> None:
    encoded = nixbase32.encode(data)
    assert set(encoded) <= set(nixbase32.ALPHABET)
    assert nixbase32.decode(encoded) == data


@pytest.mark.parametrize("bad", ["e", "o", "u", "t", "A", " ", "-"])
def test_decode_rejects_characters_outside_the_alphabet(bad: str) -> None:
    with pytest.raises(ValueError, match="character"):
        nixbase32.decode(bad + ABC_NIX32[1:])


@pytest.mark.parametrize("length", [1, 3, 51, 54])
def test_decode_rejects_impossible_lengths(length: int) -> None:
    with pytest.raises(ValueError, match="length"):
        nixbase32.decode("0" * length)


def test_decode_rejects_bits_beyond_the_last_byte() -> None:
    # 52 characters carry 260 bits; the first character may only use one of them.
    assert nixbase32.decode("1" + "0" * 51) == bytes(31) + b"\x80"
    with pytest.raises(ValueError, match="beyond"):
        nixbase32.decode("2" + "0" * 51)


@given(digests)
def test_every_notation_parses_to_the_same_digest(digest: bytes) -> None:
    for text in notations(digest):
        assert nixbase32.parse_hash(text) == digest, text
    assert nixbase32.format_hash(digest) == notations(digest)[0]


@pytest.mark.parametrize(
    "bad",
    [
        ABC_NIX32,  # no algorithm prefix
        "md5:" + "0" * 32,
        "sha512:" + "0" * 128,
        "sha256:" + ABC_NIX32[:-1],
        "sha256:" + "g" * 64,
        "sha256:" + "0" * 62 + " 0",
        "sha256:" + "e" * 52,
        "sha256-" + "A" * 43,
        "sha256-" + "!" * 43 + "=",
        "sha256:",
    ],
)
def test_parse_hash_rejects_malformed_hashes(bad: str) -> None:
    with pytest.raises(ValueError):
        nixbase32.parse_hash(bad)


def test_format_hash_rejects_non_sha256_digests() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        nixbase32.format_hash(bytes(20))


def nix_hash(command: str, hashes: list[str]) -> list[str]:
    nix = require_binary("nix")
    out = subprocess.run(
        [nix, "--extra-experimental-features", "nix-command", "hash", command, *hashes],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.split()


SAMPLE_DIGESTS = [bytes(32), b"\xff" * 32] + [random.Random(i).randbytes(32) for i in range(8)]


@pytest.mark.integration
def test_nix_agrees_with_our_base32_encoding() -> None:
    theirs = nix_hash("to-base32", ["sha256:" + d.hex() for d in SAMPLE_DIGESTS])
    assert theirs == [nixbase32.encode(d) for d in SAMPLE_DIGESTS]


@pytest.mark.integration
def test_nix_reads_what_we_write_and_we_read_what_it_writes() -> None:
    ours = [nixbase32.format_hash(d) for d in SAMPLE_DIGESTS]
    assert nix_hash("to-base16", ours) == [d.hex() for d in SAMPLE_DIGESTS]
    sri = nix_hash("to-sri", ours)
    assert [nixbase32.parse_hash(s) for s in sri] == SAMPLE_DIGESTS
