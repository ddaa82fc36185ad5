
from quantload.errors import FileFormatError, QuantloadError


def test_error_names_file_key_and_offset():
    e = FileFormatError("header runs past the end", file="/x/model.safetensors", key="w", offset=8)
    assert isinstance(e, QuantloadError)
    assert str(e) == "/x/model.safetensors: key 'w': offset 8: header runs past the end"
    assert (e.file, e.key, e.offset) == ("/x/model.safetensors", "w", 8)
