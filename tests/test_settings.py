"""Configuration: secrets refused outside development, list parsing, per-source URLs, and a service that
refuses to start with a readable message instead of a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import DEV_HMAC_KEY, DEV_JWT_SECRET, ConfigurationError, Settings, load_settings
from tests.conftest import strong

ROOT = Path(__file__).resolve().parents[1]
SECRETS = ("COINLYTICS_JWT_SECRET", "COINLYTICS_HMAC_KEY")


WEAK_VALUES = {
    "short": "s3cr3t-but-short",
    "changeme": "changeme",
    "CHANGEME": "CHANGEME",
    "placeholder": "secret",
    "repetitive": "a" * 64,
    "whitespace": " " * 40,
}


@pytest.mark.parametrize("environment", ["production", "test"])
@pytest.mark.parametrize("name", SECRETS)
def test_missing_secret_is_refused_outside_development(env, environment, name):
    env.setenv("COINLYTICS_ENV", environment)
    for other in SECRETS:
        if other != name:
            env.setenv(other, strong())
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert name in message
    assert "not set" in message


@pytest.mark.parametrize("value", list(WEAK_VALUES.values()), ids=list(WEAK_VALUES))
@pytest.mark.parametrize("name", SECRETS)
def test_weak_secret_is_refused_in_production(env, name, value):
    env.setenv("COINLYTICS_ENV", "production")
    for other in SECRETS:
        env.setenv(other, value if other == name else strong())
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert name in message
    # The refused value is never echoed back (it may be a real, if weak, secret).
    assert value.strip() == "" or value not in message


@pytest.mark.parametrize(("name", "dev_default"), [(SECRETS[0], DEV_JWT_SECRET), (SECRETS[1], DEV_HMAC_KEY)])
def test_development_defaults_are_refused_in_production(env, name, dev_default):
    env.setenv("COINLYTICS_ENV", "production")
    for other in SECRETS:
        env.setenv(other, dev_default if other == name else strong())
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


def test_strong_secrets_are_accepted_in_production(env):
    jwt, hmac = strong(), strong()
    env.setenv("COINLYTICS_ENV", "production")
    env.setenv("COINLYTICS_JWT_SECRET", jwt)
    env.setenv("COINLYTICS_HMAC_KEY", hmac)
    settings = load_settings()
    assert settings.env == "production"
    assert settings.jwt_secret_value() == jwt
    assert settings.hmac_key_bytes() == hmac.encode()
    # Secrets stay out of reprs and logs.
    assert jwt not in repr(settings)
    assert hmac not in repr(settings)


def test_production_is_the_default_environment(env):
    with pytest.raises(ConfigurationError, match="COINLYTICS_JWT_SECRET"):
        load_settings()


def test_development_fills_in_development_secrets(env):
    env.setenv("COINLYTICS_ENV", "development")
    settings = load_settings()
    assert settings.env == "development"
    assert settings.jwt_secret_value() == DEV_JWT_SECRET
    assert settings.hmac_key_bytes() == DEV_HMAC_KEY.encode()


def test_development_keeps_secrets_that_are_given(env):
    jwt = strong()
    env.setenv("COINLYTICS_ENV", "development")
    env.setenv("COINLYTICS_JWT_SECRET", jwt)
    settings = load_settings()
    assert settings.jwt_secret_value() == jwt
    assert settings.hmac_key_bytes() == DEV_HMAC_KEY.encode()


@pytest.fixture
def dev_env(env):
    env.setenv("COINLYTICS_ENV", "development")
    return env


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("btc, eth", ["BTC", "ETH"]),
        ("BTC", ["BTC"]),
        (" sol ,btc,, doge ", ["SOL", "BTC", "DOGE"]),
        ("btc,BTC,eth", ["BTC", "ETH"]),
    ],
)
def test_coins_are_read_from_csv_and_upper_cased(dev_env, raw, expected):
    dev_env.setenv("COINLYTICS_COINS", raw)
    assert load_settings().coins == expected


def test_vs_currencies_and_sources_are_read_from_csv(dev_env):
    dev_env.setenv("COINLYTICS_VS_CURRENCIES", "usd, eur")
    dev_env.setenv("COINLYTICS_SOURCES", "Binance, KRAKEN,sim")
    settings = load_settings()
    assert settings.vs_currencies == ["USD", "EUR"]
    assert settings.sources == ["binance", "kraken", "sim"]


@pytest.mark.parametrize("bad", ["BT$C", "BTC,ET H", "BTC,THISISWAYTOOLONGFORATICKER", "BTC,E-TH"])
def test_invalid_coin_symbol_is_refused_with_a_clear_message(dev_env, bad):
    dev_env.setenv("COINLYTICS_COINS", bad)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "COINLYTICS_COINS" in message
    assert "not a ticker symbol" in message


@pytest.mark.parametrize("raw", ["", " , ,"])
def test_empty_coin_list_is_refused(dev_env, raw):
    dev_env.setenv("COINLYTICS_COINS", raw)
    with pytest.raises(ConfigurationError, match="COINLYTICS_COINS"):
        load_settings()


def test_invalid_number_names_its_variable(dev_env):
    dev_env.setenv("COINLYTICS_POLL_INTERVAL_SECONDS", "soon")
    with pytest.raises(ConfigurationError, match="COINLYTICS_POLL_INTERVAL_SECONDS"):
        load_settings()


def test_source_urls_are_picked_up_from_the_environment(dev_env):
    dev_env.setenv("COINLYTICS_SOURCE_BINANCE_REST_URL", "http://127.0.0.1:9/binance")
    dev_env.setenv("COINLYTICS_SOURCE_KRAKEN_WS_URL", "ws://127.0.0.1:9/kraken")
    settings = load_settings()
    assert settings.source_url("binance", "rest") == "http://127.0.0.1:9/binance"
    assert settings.source_url("BINANCE", "rest") == "http://127.0.0.1:9/binance"
    assert settings.source_url("kraken", "ws") == "ws://127.0.0.1:9/kraken"
    assert settings.source_url("binance", "ws") is None
    assert settings.source_url("kraken", "rest") is None
    assert settings.source_url("coinbase", "rest") is None


def test_dotenv_in_the_working_directory_is_read(dev_env, tmp_path):
    (tmp_path / ".env").write_text("COINLYTICS_COINS=ltc, xrp\n")
    assert load_settings().coins == ["LTC", "XRP"]


def service_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("COINLYTICS_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.parametrize("service", ["pricing", "gateway"])
def test_service_refuses_to_start_in_production_without_a_jwt_secret(tmp_path, service):
    env = service_env()
    env["COINLYTICS_ENV"] = "production"
    env["COINLYTICS_HMAC_KEY"] = strong()
    result = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "COINLYTICS_JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"{service}: cannot start" in result.stderr


def test_source_urls_in_dotenv_are_read_and_the_environment_wins(dev_env, tmp_path):
    (tmp_path / ".env").write_text(
        "COINLYTICS_SOURCE_BINANCE_REST_URL=http://127.0.0.1:9/from-dotenv\n"
        "COINLYTICS_SOURCE_KRAKEN_WS_URL=ws://127.0.0.1:9/kraken-from-dotenv\n"
        "COINLYTICS_SOURCE_ECB_REST_URL=http://127.0.0.1:9/ecb-from-dotenv\n"
    )
    dev_env.setenv("COINLYTICS_SOURCE_ECB_REST_URL", "http://127.0.0.1:9/ecb-from-environment")
    settings = load_settings()
    assert settings.source_url("binance", "rest") == "http://127.0.0.1:9/from-dotenv"
    assert settings.source_url("kraken", "ws") == "ws://127.0.0.1:9/kraken-from-dotenv"
    assert settings.source_url("ecb", "rest") == "http://127.0.0.1:9/ecb-from-environment"
    assert settings.source_url("kraken", "rest") is None
    # An explicit value still beats both, per source.
    explicit = load_settings(source_urls={"binance_rest_url": "http://127.0.0.1:9/explicit"})
    assert explicit.source_url("binance", "rest") == "http://127.0.0.1:9/explicit"
    assert explicit.source_url("ecb", "rest") == "http://127.0.0.1:9/ecb-from-environment"


def test_another_env_file_is_read_for_source_urls(env, tmp_path):
    other = tmp_path / "deploy.env"
    other.write_text("COINLYTICS_ENV=development\nCOINLYTICS_SOURCE_COINBASE_REST_URL=http://127.0.0.1:9/cb\n")
    assert Settings(_env_file=other).source_url("coinbase", "rest") == "http://127.0.0.1:9/cb"  # type: ignore[call-arg]
