"""One line quoted from a library's error: the messages torch and the hub really raise."""

from __future__ import annotations

import pytest
import torch

from gpt2repro.errors import first_line, typed_first_line


def load_error(tmp_path, data: bytes, weights_only: bool) -> Exception:
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with pytest.raises(Exception) as caught:
        torch.load(path, weights_only=weights_only)
    return caught.value


def test_an_empty_message_gives_the_type_name(tmp_path):
    """torch.load of an empty file (a download stopped at 0 bytes) raises EOFError('') when weights only:
    the quote must neither be blank nor raise IndexError while a fault is being reported."""
    error = load_error(tmp_path, b"", weights_only=True)
    assert str(error) == ""  # torch's own behaviour, which this test relies on
    assert first_line(error) == "EOFError" and typed_first_line(error) == "EOFError"


def test_a_multi_line_message_gives_its_first_line_cut_to_the_limit(tmp_path):
    error = load_error(tmp_path, b"\x80\x02X\x01\x00\x00\x00aQ.", weights_only=False)
    assert "\n" in str(error)  # torch's persistent-id message spans lines
    assert first_line(error) == str(error).splitlines()[0].strip()
    assert typed_first_line(error, 20) == "UnpicklingError: " + str(error)[:20]
    assert first_line(RuntimeError("\n  \n  the cause  \nmore")) == "the cause"
