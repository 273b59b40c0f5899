"""Read selected tensors from a safetensors checkpoint (single file or sharded)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ppruntime.model.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors' names
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """Knows which file holds which tensor; opens only the files a caller needs."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        single_path = self.directory / SINGLE_FILE
        if index_path.is_file():
            self.reference = INDEX_FILE
            self._file_of = self._read_index(index_path)
        elif single_path.is_file():
            self.reference = None
            self._file_of = {name: SINGLE_FILE for name in self._keys_of(single_path)}
        else:
            raise ModelLoadError(
                f"no weights in {self.directory}: expected {SINGLE_FILE} or {INDEX_FILE}"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(
        self, names: Iterable[str], expected_shapes: dict[str, tuple[int, ...]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for `names`, each file opened once; shapes are checked."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise ModelLoadError(f"tensor {name} not found in {self._listing_path()}")
            by_file.setdefault(self._file_of[name], []).append(name)
        for file_name, file_names in by_file.items():
            path = self.directory / file_name
            if not path.is_file():
                suffix = f" (referenced by {self.reference})" if self.reference else ""
                raise ModelLoadError(f"safetensors file {path} not found{suffix}")
            yield from self._read_file(path, file_names, expected_shapes)

    def _read_file(
        self, path: Path, names: list[str], expected_shapes: dict[str, tuple[int, ...]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                present = set(handle.keys())
                for name in names:
                    if name not in present:
                        raise ModelLoadError(self._missing_message(name, path))
                    tensor_slice = handle.get_slice(name)
                    shape = tuple(tensor_slice.get_shape())
                    expected = expected_shapes[name]
                    if shape != expected:
                        raise ModelLoadError(
                            f"tensor {name} in {path} has shape {list(shape)} but the model "
                            f"config expects {list(expected)}"
                        )
                    dtype = tensor_slice.get_dtype()
                    if dtype not in FLOAT_DTYPES:
                        # an integer tensor would be copied into the float weights as
                        # numbers: quantized or mislabelled, either way wrong
                        raise ModelLoadError(
                            f"tensor {name} in {path} has dtype {dtype}; weights must be "
                            f"floating point ({', '.join(FLOAT_DTYPES)})"
                        )
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read {path}: corrupt or truncated ({exc})") from None

    def _missing_message(self, name: str, where: Path | str) -> str:
        suffix = f" (referenced by {self.reference})" if self.reference else ""
        return f"tensor {name} not found in {where}{suffix}"

    def _listing_path(self) -> Path:
        return self.directory / (self.reference or SINGLE_FILE)

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read {path}: corrupt or truncated ({exc})") from None

    @staticmethod
    def _read_index(path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path} is not a valid safetensors index: {exc}") from None
        return {str(name): str(file) for name, file in weight_map.items()}
