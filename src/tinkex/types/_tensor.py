"""TensorData: a dense or sparse-CSR array on the wire, with numpy and torch conversions."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import model_validator

from ._base import WireModel

if TYPE_CHECKING:
    import torch

TensorDtype = Literal["int64", "float32"]

_NUMPY_DTYPES: dict[str, np.dtype] = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}


def wire_dtype(dtype: np.dtype) -> TensorDtype:
    """The wire dtype for a numpy dtype: float kinds widen or narrow to float32, signed ints to int64."""
    if dtype.kind == "f":
        return "float32"
    if dtype.kind == "i":
        return "int64"
    raise ValueError(f"TensorData holds signed integers or floats, not {dtype}")


class TensorData(WireModel):
    data: list[int] | list[float]
    dtype: TensorDtype
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    @model_validator(mode="after")
    def _check_layout(self) -> TensorData:
        if (self.sparse_crow_indices is None) != (self.sparse_col_indices is None):
            raise ValueError("sparse_crow_indices and sparse_col_indices come together")
        if self.sparse_crow_indices is not None:
            if self.shape is None or len(self.shape) != 2:
                raise ValueError("a sparse CSR tensor needs a 2-D shape")
            if len(self.sparse_crow_indices) != self.shape[0] + 1:
                raise ValueError("sparse_crow_indices must have nrows + 1 entries")
            if len(self.sparse_col_indices or []) != len(self.data):
                raise ValueError("sparse_col_indices must have one entry per value")
        elif self.shape is not None and math.prod(self.shape) != len(self.data):
            raise ValueError(f"shape {self.shape} does not match {len(self.data)} values")
        return self

    @property
    def is_sparse(self) -> bool:
        return self.sparse_crow_indices is not None

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        array = np.asarray(array)
        dtype = wire_dtype(array.dtype)
        return cls(data=array.astype(_NUMPY_DTYPES[dtype]).ravel().tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # bfloat16 and half have no numpy twin on the wire
        return cls.from_numpy(tensor.contiguous().numpy())

    @classmethod
    def from_torch_sparse(cls, tensor: torch.Tensor, pad_value: int = 0) -> TensorData:
        """CSR when it is smaller than the dense form (2-D only); cells equal to pad_value are left out."""
        if tensor.ndim != 2:
            return cls.from_torch(tensor)
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return cls.from_numpy_sparse(tensor.numpy(), pad_value)

    @classmethod
    def from_numpy_sparse(cls, array: np.ndarray, pad_value: int = 0) -> TensorData:
        array = np.asarray(array)
        if array.ndim != 2:
            return cls.from_numpy(array)
        mask = array != pad_value
        nnz = int(mask.sum())
        nrows, ncols = array.shape
        if (nrows + 1) + 2 * nnz >= nrows * ncols:
            return cls.from_numpy(array)
        rows, cols = np.nonzero(mask)
        crow = np.zeros(nrows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=nrows), out=crow[1:])
        dtype = wire_dtype(array.dtype)
        return cls(
            data=array[rows, cols].astype(_NUMPY_DTYPES[dtype]).tolist(),
            dtype=dtype,
            shape=[nrows, ncols],
            sparse_crow_indices=crow.tolist(),
            sparse_col_indices=cols.astype(np.int64).tolist(),
        )

    def to_numpy(self, pad_value: int | float = 0) -> np.ndarray:
        values = np.asarray(self.data, dtype=_NUMPY_DTYPES[self.dtype])
        if self.sparse_crow_indices is None:
            return values.reshape(self.shape) if self.shape is not None else values
        assert self.shape is not None and self.sparse_col_indices is not None
        dense = np.full(self.shape, pad_value, dtype=values.dtype)
        crow = np.asarray(self.sparse_crow_indices, dtype=np.int64)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(crow))
        dense[rows, np.asarray(self.sparse_col_indices, dtype=np.int64)] = values
        return dense

    def to_torch(self, pad_value: int | float = 0) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.to_numpy(pad_value))

    def tolist(self, pad_value: int | float = 0) -> list[Any]:
        return self.to_numpy(pad_value).tolist()
