"""The serving wire format without a model: msgpack-numpy codec, request checks, API keys."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from molmoact2_edge.errors import CodecError, ServingError
from molmoact2_edge.serving import auth
from molmoact2_edge.serving.codec import UnpackLimits, packb, unpackb
from molmoact2_edge.serving.protocol import RequestError, RequestLimits, parse_request, reply

CAMERAS = ["front", "wrist"]
DTYPES = st.sampled_from(["<f4", "<f8", "<f2", "|u1", "<i8", "<i4", "<u2", "|b1", "|i1"])


def _openpi_style(obj: np.ndarray) -> bytes:
    """openpi_client.msgpack_numpy's encoding, written out from its source (0.1.2) for comparison."""
    return msgpack.packb({b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape})


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
def test_arrays_round_trip_and_pack_as_openpi_does(array: np.ndarray) -> None:
    data = packb(array)
    assert data == _openpi_style(array)
    back = unpackb(data)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@given(st.one_of(st.integers(-(2**31), 2**31), st.floats(allow_nan=False, width=32)))
def test_numpy_scalars_round_trip(value: float) -> None:
    scalar = np.float32(value) if isinstance(value, float) else np.int64(value)
    back = unpackb(packb({"x": scalar}))["x"]
    assert type(back) is type(scalar) and back == scalar


@pytest.mark.parametrize("dtype", ["|O", "<c8", "|V8", "<M8[s]", "<U3", "|S4", [("a", "<f4")]])
def test_refused_dtypes_never_become_arrays(dtype: object) -> None:
    crafted = {b"__ndarray__": True, b"data": b"\0" * 16, b"dtype": dtype if isinstance(dtype, str) else "|V4", b"shape": [1]}
    with pytest.raises(CodecError, match="refused|unknown|needs"):
        unpackb(msgpack.packb(crafted))


def test_pack_refuses_object_and_complex() -> None:
    for bad in (np.array([1 + 2j]), np.array([object()], dtype=object)):
        with pytest.raises(CodecError):
            packb(bad)


def test_inconsistent_arrays_and_garbage_are_codec_errors() -> None:
    short = {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}
    with pytest.raises(CodecError, match="needs 8 bytes"):
        unpackb(msgpack.packb(short))
    negative = {b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]}
    with pytest.raises(CodecError, match="shape"):
        unpackb(msgpack.packb(negative))
    with pytest.raises(CodecError):
        unpackb(b"\xc1 not msgpack")
    with pytest.raises(CodecError, match="exceeds"):
        unpackb(b"\0" * 100, UnpackLimits(max_bytes=10))
    with pytest.raises(CodecError):  # a map wider than the limit is refused while parsing
        unpackb(msgpack.packb({str(i): i for i in range(100)}), UnpackLimits(max_map_len=10))


def _request(**overrides: object) -> dict:
    rng = np.random.default_rng(0)
    body = {
        "images": {c: rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for c in CAMERAS},
        "state": np.zeros(6, np.float32),
        "prompt": "pick up the cube",
    }
    body.update(overrides)
    return body


def test_a_good_request_becomes_an_observation() -> None:
    req = parse_request(packb(_request(seed=3, reset=True, deadline_ms=250)), CAMERAS, 6, RequestLimits())
    assert sorted(req.observation.images) == CAMERAS and req.observation.task == "pick up the cube"
    assert req.seed == 3 and req.reset and req.deadline_s == pytest.approx(0.25)
    assert req.observation.state.dtype == np.float32


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"images": {"front": np.zeros((8, 8, 3), np.uint8)}}, "missing \\['wrist'\\]"),
        ({"state": np.zeros(5, np.float32)}, "expected shape \\(6,\\)"),
        ({"state": np.zeros(6, np.int32)}, "float32 array"),
        ({"state": np.full(6, np.nan, np.float32)}, "non-finite"),
        ({"prompt": ""}, "non-empty"),
        ({"prompt": "x" * 1001}, "exceeds the limit"),
        ({"seed": -1}, "seed"),
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"extra": 1}, "unknown \\['extra'\\]"),
        ({"images": {c: np.zeros((8, 8), np.uint8) for c in CAMERAS}}, "uint8 \\(h, w, 3\\)"),
        ({"images": {c: np.zeros((8, 8, 3), np.float32) for c in CAMERAS}}, "uint8 \\(h, w, 3\\)"),
        ({"images": {c: np.zeros((1300, 8, 3), np.uint8) for c in CAMERAS}}, "outside 1..1280"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(overrides: dict, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        parse_request(packb(_request(**overrides)), CAMERAS, 6, RequestLimits())


def test_text_frames_and_non_maps_are_refused() -> None:
    with pytest.raises(RequestError, match="binary"):
        parse_request("hello", CAMERAS, 6, RequestLimits())
    with pytest.raises(RequestError, match="map"):
        parse_request(packb([1, 2]), CAMERAS, 6, RequestLimits())


def test_reply_is_float32_and_milliseconds() -> None:
    out = unpackb(packb(reply(np.ones((4, 6)), {"flow": 0.0125})))
    assert out["actions"].dtype == np.float32 and out["timing"] == {"flow": 12.5}


def test_api_keys_come_from_a_file_or_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
    assert auth.load_api_key(None) is None
    monkeypatch.setenv(auth.API_KEY_ENV, "k" * 20)
    assert auth.load_api_key(None) == "k" * 20
    key_file = tmp_path / "key"
    key_file.write_text("secret-from-the-file-123\n")
    assert auth.load_api_key(key_file) == "secret-from-the-file-123"  # the file wins over the environment
    key_file.write_text("\n")
    with pytest.raises(ServingError, match="empty"):
        auth.load_api_key(key_file)


def test_keys_are_required_beyond_loopback_and_compared_whole() -> None:
    auth.check_server_key("127.0.0.1", None, allow_no_key=False)
    auth.check_server_key("::1", None, allow_no_key=False)
    auth.check_server_key("0.0.0.0", None, allow_no_key=True)
    with pytest.raises(ServingError, match="needs an API key"):
        auth.check_server_key("0.0.0.0", None, allow_no_key=False)
    with pytest.raises(ServingError, match="at least"):
        auth.check_server_key("0.0.0.0", "short", allow_no_key=False)
    key = "a-long-enough-api-key"
    assert auth.authorized(f"Api-Key {key}", key)
    assert not auth.authorized(f"Api-Key {key}x", key)
    assert not auth.authorized(f"Bearer {key}", key)
    assert not auth.authorized(None, key)
    assert auth.authorized(None, None)


def test_preflight_names_every_mismatch_between_policy_and_robot() -> None:
    from molmoact2_edge.errors import ContractError
    from molmoact2_edge.serving.contract import check_robot

    contract = {"cameras": ["front", "wrist"], "image_size": [64, 64], "state_dim": 6, "action_dim": 6, "chunk_length": 6, "control_hz": None}
    joints = ("a", "b", "c", "d", "e", "f")
    check_robot(contract, ["front", "wrist", "top"], joints, 30.0)
    with pytest.raises(ContractError, match=r"cameras \['wrist'\] are missing.*state_dim is 6 but the robot has 5"):
        check_robot(contract, ["front"], joints[:5], 30.0)
    with pytest.raises(ContractError, match="recorded at 15 Hz but the loop runs at 30 Hz"):
        check_robot({**contract, "control_hz": 15.0}, ["front", "wrist"], joints, 30.0)
    with pytest.raises(ContractError, match="lacks"):
        check_robot({"cameras": []}, [], joints, 30.0)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=64), MSGPACK_VALUES.map(msgpack.packb)))
def test_any_bytes_are_refused_with_a_serving_error_or_parsed(data: bytes) -> None:
    """Fuzz: whatever arrives, parsing ends in a request or a ServingError (never another exception)."""
    try:
        request = parse_request(data, CAMERAS, 6, RequestLimits())
    except ServingError as err:
        assert str(err)  # a message to send back
    else:
        assert sorted(request.observation.images) == CAMERAS


@settings(max_examples=100, deadline=None)
@given(
    st.fixed_dictionaries(
        {b"__ndarray__": st.just(True)},
        optional={
            b"data": st.binary(max_size=32) | st.integers(-(2**31), 2**31),
            b"dtype": st.sampled_from(["<f4", "|O", "<c16", "|V2", "f", "float32", "<U1", "x"]) | st.integers(0, 9),
            b"shape": st.lists(st.integers(-2, 8), max_size=4) | st.integers(-2, 8),
        },
    )
)
def test_crafted_array_maps_never_escape_as_other_exceptions(crafted: dict) -> None:
    try:
        array = unpackb(msgpack.packb(crafted))
    except CodecError:
        return
    assert isinstance(array, np.ndarray) and array.dtype.kind in "biuf"


def test_a_shape_that_would_overflow_int64_is_refused() -> None:
    crafted = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "<f4", b"shape": [2**40, 2**40, 2**40]}
    with pytest.raises(CodecError, match="needs"):
        unpackb(msgpack.packb(crafted))


def test_cli_refuses_a_public_server_without_a_key_and_run_without_a_policy(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from molmoact2_edge.cli.main import cli

    monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "needs an API key" in result.output and "--api-key-file" in result.output
    result = CliRunner().invoke(cli, ["run", "--robot", "sim-so101"])
    assert result.exit_code == 1 and "give either BUNDLE or --policy" in result.output
    result = CliRunner().invoke(cli, ["run", "--policy", "http://x:1", "--robot", "sim-so101"])
    assert result.exit_code != 0 and "expected ws://HOST:PORT" in result.output
    assert "--api-key" not in CliRunner().invoke(cli, ["serve", "--help"]).output.replace("--api-key-file", "")
