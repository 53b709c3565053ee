"""Key and token formats, hashing, constant-time checks, argon2 passwords."""

from __future__ import annotations

from api.auth.credentials import (
    api_key,
    bearer_from_header,
    credential_from_headers,
    digest_matches,
    hash_password,
    login_token,
    new_id,
    new_secret,
    parse_bearer,
    sha256_hex,
    user_id_for,
    verify_password,
)


def test_api_keys_and_login_tokens_parse_back_even_with_underscores_in_the_secret() -> None:
    key_id, user_id, token_id = new_id(), user_id_for("A@Example.org "), new_id()
    secret = "ab_cd-ef_" + new_secret()
    key = parse_bearer(api_key(key_id, secret))
    assert (key.kind, key.ids, key.secret) == ("key", (key_id,), secret)
    token = parse_bearer(login_token(user_id, token_id, secret))
    assert (token.kind, token.ids, token.secret) == ("token", (user_id, token_id), secret)
    assert secret not in repr(token)


def test_anything_else_is_opaque() -> None:
    for value in ("sk-test", "iq_notHex_secret", "iqt_abc", "iq__x"):
        assert parse_bearer(value).kind == "opaque"


def test_bearer_header() -> None:
    assert bearer_from_header("Bearer abc") == "abc"
    assert bearer_from_header("bearer  abc ") == "abc"
    assert bearer_from_header("Basic abc") is None
    assert bearer_from_header("Bearer ") is None
    assert bearer_from_header(None) is None


def test_x_api_key_is_a_credential_too_and_bearer_wins() -> None:
    assert credential_from_headers(None, " sk-ant ") == "sk-ant"
    assert credential_from_headers("Bearer abc", "sk-ant") == "abc"
    assert credential_from_headers("Basic abc", "sk-ant") == "sk-ant"
    assert credential_from_headers(None, "  ") is None
    assert credential_from_headers(None, None) is None


def test_digests_match_only_the_same_secret() -> None:
    stored = sha256_hex("s3cret")
    assert digest_matches("s3cret", stored)
    assert not digest_matches("s3creT", stored)


def test_emails_are_normalised_for_ids() -> None:
    assert user_id_for("  Ann@Example.ORG") == user_id_for("ann@example.org")


async def test_passwords_use_argon2() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert await verify_password("correct horse", stored)
    assert not await verify_password("wrong horse", stored)
    assert not await verify_password("correct horse", None)  # unknown user: same work, always false
