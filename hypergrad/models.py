"""Flax NNX models and losses, used through a pure ``(apply, params)`` pair.

Models are defined with NNX. At the boundary of the differentiable loop, :func:`functional`
splits a module into a pure function and a plain dict of arrays, so that ``lax.scan``,
``jax.grad`` and ``jax.jvp`` only ever see pytrees. Every model is called as
``model(x, slope)``, where ``slope`` is the negative slope of the leaky ReLU (a
differentiable hyperparameter; 0 gives the plain ReLU), or a list of slopes, one per
activation layer (:func:`activation_layers`). Training-time noise is functional: a model
called with ``dropout=rate, key=key`` applies Gaussian dropout (:func:`gaussian_dropout`)
after every hidden activation, drawn from ``key``; without a key it is the deterministic
(evaluation) model. A model with BatchNorm keeps its running statistics outside the
parameters (:func:`stateful`).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Array = jax.Array
Params = dict[Any, Any]

__all__ = [
    "LOSSES",
    "MLP",
    "BatchNorm",
    "BatchNormCNN",
    "Conv3x3",
    "Functional",
    "LogisticRegression",
    "SeedCNN",
    "Stateful",
    "accuracy",
    "activation_layers",
    "cross_entropy",
    "functional",
    "gaussian_dropout",
    "gaussian_noise",
    "leaky_relu",
    "loss_by_name",
    "mse",
    "onehot_mse",
    "random_translate",
    "stateful",
    "translate",
]


# --------------------------------------------------------------------------------------
# Module <-> pure function


class Functional(NamedTuple):
    """A model as a pure function and its parameters; unpacks as ``apply, params``."""

    apply: Callable[..., Array]
    params: Params


def functional(module: nnx.Module) -> Functional:
    """Split an NNX module into a pure ``apply`` function and a plain parameter dict.

    ``params`` is ``nnx.to_pure_dict`` of the module's ``nnx.Param`` state: a nested dict
    of arrays keyed by module path (``params["convs"][0]["kernel"]``).
    ``apply(params, *args, **kwargs)`` merges the module inside and returns
    ``module(*args, **kwargs)``; it is pure, so it works under ``jit``, ``grad``, ``jvp``
    and ``lax.scan`` and is differentiable in ``params`` and in array arguments such as
    ``slope``. Any non-parameter state is frozen at its current value; use
    :func:`stateful` for a model whose state (BatchNorm statistics) must evolve.

    Args:
      module: the NNX module; it is not modified, and later changes to it are not seen.

    Returns:
      ``Functional(apply, params)``.
    """
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)  # type: ignore[misc]
    params = nnx.to_pure_dict(state)
    treedef = jax.tree.structure(params)

    def apply(params: Params, *args: Any, **kwargs: Any) -> Array:
        if jax.tree.structure(params) != treedef:  # type: ignore[operator]
            raise ValueError(
                f"params do not match the module's structure: expected {treedef}, got "
                f"{jax.tree.structure(params)}"
            )
        return nnx.merge(graphdef, params, rest)(*args, **kwargs)

    return Functional(apply, params)


class Stateful(NamedTuple):
    """A model with non-parameter state as a pure function; unpacks as
    ``apply, params, state``."""

    apply: Callable[..., tuple[Array, Params]]
    params: Params
    state: Params


def stateful(module: nnx.Module) -> Stateful:
    """Split an NNX module with BatchNorm into a pure function, parameters and state.

    ``state`` is ``nnx.to_pure_dict`` of the module's ``nnx.BatchStat`` variables (running
    means and variances). ``apply(params, state, *args, **kwargs) -> (output, new_state)``
    merges both, calls the module, and returns the statistics after the call: updated
    when the module runs in training mode (``train=True`` for :class:`BatchNormCNN`),
    unchanged otherwise. The new state is a function of ``params`` and ``state``, so
    carrying it through a ``lax.scan`` differentiates it too.
    """
    graphdef, params_state, stats, rest = nnx.split(  # type: ignore[misc]
        module, nnx.Param, nnx.BatchStat, ...)
    params, state = nnx.to_pure_dict(params_state), nnx.to_pure_dict(stats)

    def apply(params: Params, state: Params, *args: Any, **kwargs: Any):
        model = nnx.merge(graphdef, params, state, rest)
        out = model(*args, **kwargs)
        return out, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    return Stateful(apply, params, state)


# --------------------------------------------------------------------------------------
# Training-time noise: each a function of a key and a differentiable strength


def gaussian_dropout(key: Array, x: Array, rate: Array | float) -> Array:
    """Gaussian dropout: ``x * (1 + sqrt(rate / (1 - rate)) * z)``, ``z ~ N(0, 1)``.

    The multiplicative noise has the mean (1) and variance (``rate / (1 - rate)``) of
    inverted Bernoulli dropout with drop probability ``rate`` (Srivastava et al. 2014,
    §10; Wang & Manning 2013), but for a fixed ``z`` it is a smooth function of
    ``rate``, so the hypergradient of the rate is the exact derivative of the sampled
    objective: central differences with the same key agree with it. (A relaxed Bernoulli
    mask would need a temperature, a second hyperparameter, and is biased for any
    positive one.) ``rate`` must lie in ``[0, 1)``; at 0 nothing is drawn into ``x``.
    """
    rate = jnp.asarray(rate, x.dtype)
    z = jax.random.normal(key, x.shape, x.dtype)
    return x * (1 + jnp.sqrt(rate / (1 - rate)) * z)


def gaussian_noise(key: Array, x: Array, std: Array | float) -> Array:
    """``x + std * z`` with ``z ~ N(0, 1)`` of ``x``'s shape: additive input noise,
    differentiable in ``std``."""
    return x + jnp.asarray(std, x.dtype) * jax.random.normal(key, x.shape, x.dtype)


def translate(x: Array, shift: Array, image_shape: tuple[int, ...]) -> Array:
    """Shift each image by a real number of pixels, bilinearly, with zero padding.

    ``out[n, i, j] = sum_{a, b} k(i - shift[n, 0] - a) k(j - shift[n, 1] - b) x[n, a, b]``
    with the tent kernel ``k(u) = max(0, 1 - |u|)``: an integer shift moves the image
    exactly; in between it interpolates. Piecewise linear in ``shift`` (kinks only where
    a shift crosses an integer), so differentiable almost everywhere.

    Args:
      x: ``N`` images, shaped ``(N, H, W, C)`` or anything of ``N`` rows that reshapes to
        it (flat digits).
      shift: ``(N, 2)`` shifts in pixels, down and right.
      image_shape: ``(H, W, C)``.
    """
    h, w, c = image_shape
    imgs = x.reshape(x.shape[0], h, w, c)
    shift = shift.astype(imgs.dtype)

    def tent(size, s):  # (N, size, size): weight of source pixel b in output pixel a
        a = jnp.arange(size, dtype=imgs.dtype)
        u = a[None, :, None] - s[:, None, None] - a[None, None, :]
        return jnp.maximum(0, 1 - jnp.abs(u))

    out = jnp.einsum("nia,najc,nbj->nibc", tent(h, shift[:, 0]), imgs,
                     tent(w, shift[:, 1]))
    return out.reshape(x.shape)


def random_translate(key: Array, x: Array, strength: Array | float,
                     image_shape: tuple[int, ...]) -> Array:
    """Translate each image by ``strength * u`` pixels, ``u ~ U(-1, 1)^2`` per image
    (:func:`translate`); differentiable in ``strength``."""
    u = jax.random.uniform(key, (x.shape[0], 2), x.dtype, -1.0, 1.0)
    return translate(x, jnp.asarray(strength, x.dtype) * u, image_shape)


def _dropout(x: Array, rate: Any, key: Array | None, i: int) -> Array:
    """Gaussian dropout of hidden layer ``i`` when training (a key is given)."""
    if key is None or rate is None:
        return x
    return gaussian_dropout(jax.random.fold_in(key, i), x, rate)


# --------------------------------------------------------------------------------------
# Layers


def _slope(slope: Any, i: int) -> Any:
    """The slope of activation layer ``i``: ``slope[i]`` for a list or tuple (one per
    activation layer), else ``slope`` itself."""
    return slope[i] if isinstance(slope, list | tuple) else slope


def activation_layers(model: nnx.Module) -> tuple[tuple[Any, ...], ...]:
    """The parameter paths of the layers a leaky ReLU follows, in order, such as
    ``(("convs", 0), ("convs", 1), ("convs", 2))`` for :class:`SeedCNN`; a per-layer
    slope is a list with one value for each."""
    return tuple(getattr(model, "activations", lambda: ())())


def leaky_relu(x: Array, slope: Array | float) -> Array:
    """``x`` where ``x >= 0``, else ``slope * x``; differentiable in ``slope``."""
    slope = jnp.asarray(slope, x.dtype)  # keep activations in the model's dtype
    return jnp.where(x >= 0, x, slope * x)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _lecun_normal(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    """``nnx.initializers.lecun_normal()``, bit for bit, but cheaper to compile."""
    # Drawn flat and reshaped, which gives the same numbers: XLA:CPU compiles jax's threefry
    # for an N-d shape 4-8x slower than for a flat one (0.7-1.6 s against 0.2 s), and run
    # eagerly each op compiles separately; this makes building a model a few times faster.
    variance = jnp.array(1 / math.prod(shape[:-1]), dtype)
    std = jnp.sqrt(variance) / jnp.array(0.87962566103423978, dtype)  # N(0,1) cut at +-2
    w = jax.random.truncated_normal(key, -2, 2, (math.prod(shape),), dtype) * std
    return w.reshape(shape)


def _dense(din: int, dout: int, rngs: nnx.Rngs, param_dtype: Any) -> nnx.Linear:
    return nnx.Linear(din, dout, rngs=rngs, param_dtype=param_dtype, kernel_init=_lecun_normal)


def _conv3x3_native(x: Array, kernel: Array) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _conv3x3_matmul(x: Array, kernel: Array) -> Array:
    # im2col: the nine shifted HxW windows side by side along channels, then one matmul
    # with the kernel as a (9*cin, cout) matrix; rows ordered (dy, dx, cin) as in HWIO.
    _, h, w, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate(
        [xp[:, dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)], axis=-1
    )
    return cols @ kernel.reshape(9 * cin, kernel.shape[-1])


_CONV_IMPLS = {"matmul": _conv3x3_matmul, "native": _conv3x3_native}


CONVS = ("auto", "matmul", "native")

#: ``conv="auto"`` on an accelerator takes the im2col matmul for images of at most this
#: many pixels, XLA's native convolution above. Measured on one H200 (issue 20; the seed
#: CNN 8,16,16, 8x8 digits, batch 100, reverse mode): the matmul form was 2x faster for
#: one run and 6x for a vmapped population of 64 (0.016 s against 0.030 s at P = 1, 0.21 s
#: against 1.22 s at P = 64). Larger images have not been measured on a GPU yet
#: (``scripts/gpu_check.sh`` times 28x28 both ways); they keep the native convolution.
MATMUL_MAX_PIXELS = 64


def conv_form(conv: str, image_shape: tuple[int, ...], backend: str | None = None) -> str:
    """The form ``conv`` takes for ``(height, width)`` images on ``backend`` (default
    JAX's): ``"matmul"`` or ``"native"`` as asked; ``"auto"`` takes ``"matmul"`` on CPU,
    where XLA runs a convolution's backward pass 10-40x slower inside ``lax.scan`` than
    outside it (jax-ml/jax#12868) and the matmul form does not slow down, and elsewhere up
    to :data:`MATMUL_MAX_PIXELS` pixels, ``"native"`` above."""
    if conv not in CONVS:
        raise ValueError(f"conv must be 'auto', 'matmul' or 'native', got {conv!r}")
    if conv != "auto":
        return conv
    if (backend or jax.default_backend()) == "cpu":
        return "matmul"
    return "matmul" if math.prod(image_shape) <= MATMUL_MAX_PIXELS else "native"


class Conv3x3(nnx.Module):
    """3x3 convolution, stride 1, SAME padding, with bias; NHWC input, HWIO kernel.

    Args:
      in_channels: input channels.
      out_channels: output channels.
      rngs: random streams for the initializer (LeCun normal kernel, zero bias).
      conv: ``"matmul"`` (im2col, a single matmul), ``"native"``
        (``lax.conv_general_dilated``) or ``"auto"`` (chosen per image size and backend
        when called: :func:`conv_form`). Both forms have the same parameters and compute
        the same function.
      param_dtype: dtype of the parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs,
                 conv: str = "auto", param_dtype: Any = jnp.float32):
        conv_form(conv, ())  # refuse an unknown form here, not at the first call
        self.conv = conv
        self.kernel = nnx.Param(
            _lecun_normal(rngs.params(), (3, 3, in_channels, out_channels), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype))

    def __call__(self, x: Array) -> Array:
        dtype = jnp.result_type(x, self.kernel[...], self.bias[...])
        x = x.astype(dtype)
        kernel, bias = self.kernel[...].astype(dtype), self.bias[...].astype(dtype)
        form = conv_form(self.conv, x.shape[1:3])
        return _CONV_IMPLS[form](x, kernel) + bias.reshape(1, 1, 1, -1)


def _flatten(x: Array) -> Array:
    return x.reshape(x.shape[0], -1)


class BatchNorm(nnx.Module):
    """Batch normalization over every axis but the last (Ioffe & Szegedy 2015).

    In training mode it normalizes with the batch's mean and (biased) variance and
    moves the running statistics towards them, ``r <- momentum r + (1 - momentum) b``;
    otherwise it normalizes with the running statistics. Unlike ``nnx.BatchNorm``, which
    updates its statistics under ``stop_gradient``, the update stays differentiable, so
    a hypergradient sees how the hyperparameters moved the statistics the validation
    loss uses. The statistics are ``nnx.BatchStat`` variables in ``param_dtype``.

    Args:
      features: the size of the last axis.
      momentum: the running statistics' decay per training call.
      epsilon: added to the variance.
      param_dtype: dtype of the scale, bias and statistics.
    """

    def __init__(self, features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 param_dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((features,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((features,), param_dtype))
        self.momentum, self.epsilon = momentum, epsilon

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean((x - mean.reshape((1,) * len(axes) + (-1,))) ** 2, axis=axes)
            m = self.momentum
            old_mean, old_var = self.mean[...], self.var[...]
            self.mean[...] = (m * old_mean + (1 - m) * mean).astype(old_mean.dtype)
            self.var[...] = (m * old_var + (1 - m) * var).astype(old_var.dtype)
        else:
            mean, var = self.mean[...], self.var[...]
        shape = (1,) * len(axes) + (-1,)
        scale = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        return ((x - mean.reshape(shape)) * scale.reshape(shape)
                + self.bias[...].reshape(shape)).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Models


class SeedCNN(nnx.Module):
    """3x3 conv + leaky ReLU layers, then a dense head to logits; the seed's CNN.

    Called as ``model(x, slope)`` with ``x`` of shape ``(N, H, W, C)`` (or anything of
    ``N`` rows that reshapes to it, such as flat ``(N, H*W*C)`` digits), returns
    ``(N, num_classes)`` logits.

    Args:
      rngs: random streams for initialization.
      in_channels: input channels ``C``.
      channels: output channels of each convolution.
      num_classes: number of logits.
      image_shape: input ``(H, W)``; fixes the head's input size.
      conv: convolution implementation, see :class:`Conv3x3`.
      param_dtype: dtype of the parameters.
    """

    def __init__(self, rngs: nnx.Rngs, *, in_channels: int = 1,
                 channels: Sequence[int] = (8, 16, 16), num_classes: int = 10,
                 image_shape: tuple[int, int] = (8, 8), conv: str = "auto",
                 param_dtype: Any = jnp.float32):
        self.input_shape = (*image_shape, in_channels)
        widths = (in_channels, *channels)
        self.convs = nnx.List([
            Conv3x3(cin, cout, rngs=rngs, conv=conv, param_dtype=param_dtype)
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        ])
        h, w = image_shape
        self.head = _dense(h * w * widths[-1], num_classes, rngs, param_dtype)

    def __call__(self, x: Array, slope: Array | float | Sequence, *, dropout: Any = None,
                 key: Array | None = None) -> Array:
        """Logits; with a ``key``, Gaussian dropout at rate ``dropout`` after every
        activation (:func:`gaussian_dropout`)."""
        x = x.reshape(x.shape[0], *self.input_shape)
        for i, conv in enumerate(self.convs):
            x = _dropout(leaky_relu(conv(x), _slope(slope, i)), dropout, key, i)
        return self.head(_flatten(x))

    def activations(self) -> list[tuple[Any, ...]]:
        """The paths of the convolutions, each followed by a leaky ReLU."""
        return [("convs", i) for i in range(len(self.convs))]


class BatchNormCNN(nnx.Module):
    """:class:`SeedCNN` with BatchNorm between each convolution and its leaky ReLU.

    Called as ``model(x, slope, train=False)``: in training mode each BatchNorm
    normalizes with the batch's statistics and updates its running averages (momentum
    ``momentum``); otherwise it uses the running averages. Use it through
    :func:`stateful`, which carries the statistics as explicit state.

    Args:
      rngs, in_channels, channels, num_classes, image_shape, conv, param_dtype: as for
        :class:`SeedCNN`; the running statistics take ``param_dtype`` too.
      momentum: the running averages' decay per training call.
    """

    def __init__(self, rngs: nnx.Rngs, *, in_channels: int = 1,
                 channels: Sequence[int] = (8, 16, 16), num_classes: int = 10,
                 image_shape: tuple[int, int] = (8, 8), conv: str = "auto",
                 param_dtype: Any = jnp.float32, momentum: float = 0.9):
        self.input_shape = (*image_shape, in_channels)
        widths = (in_channels, *channels)
        self.convs = nnx.List([
            Conv3x3(cin, cout, rngs=rngs, conv=conv, param_dtype=param_dtype)
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        ])
        self.norms = nnx.List([BatchNorm(cout, momentum=momentum, param_dtype=param_dtype)
                               for cout in channels])
        h, w = image_shape
        self.head = _dense(h * w * widths[-1], num_classes, rngs, param_dtype)

    def __call__(self, x: Array, slope: Array | float | Sequence, *, train: bool = False,
                 dropout: Any = None, key: Array | None = None) -> Array:
        x = x.reshape(x.shape[0], *self.input_shape)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = norm(conv(x), train=train)
            x = _dropout(leaky_relu(x, _slope(slope, i)), dropout, key, i)
        return self.head(_flatten(x))

    def activations(self) -> list[tuple[Any, ...]]:
        """The paths of the convolutions, each followed by a leaky ReLU."""
        return [("convs", i) for i in range(len(self.convs))]


class MLP(nnx.Module):
    """Dense layers with a leaky ReLU between them; the input is flattened.

    Args:
      rngs: random streams for initialization.
      sizes: layer widths, from the flattened input size to the number of logits.
      param_dtype: dtype of the parameters.
    """

    def __init__(self, rngs: nnx.Rngs, sizes: Sequence[int] = (64, 50, 50, 10),
                 param_dtype: Any = jnp.float32):
        self.layers = nnx.List([
            _dense(din, dout, rngs, param_dtype)
            for din, dout in zip(sizes[:-1], sizes[1:], strict=True)
        ])

    def __call__(self, x: Array, slope: Array | float | Sequence, *, dropout: Any = None,
                 key: Array | None = None) -> Array:
        """Logits; with a ``key``, Gaussian dropout at rate ``dropout`` after every
        hidden activation (:func:`gaussian_dropout`)."""
        x = _flatten(x)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = _dropout(leaky_relu(x, _slope(slope, i)), dropout, key, i)
        return x

    def activations(self) -> list[tuple[Any, ...]]:
        """The paths of the hidden layers, each followed by a leaky ReLU."""
        return [("layers", i) for i in range(len(self.layers) - 1)]


class LogisticRegression(nnx.Module):
    """Multinomial logistic regression: one dense layer on the flattened input.

    Accepts and ignores ``slope`` so that every model is called as ``model(x, slope)``.

    Args:
      rngs: random streams for initialization.
      in_features: flattened input size.
      num_classes: number of logits.
      param_dtype: dtype of the parameters.
    """

    def __init__(self, rngs: nnx.Rngs, in_features: int, num_classes: int,
                 param_dtype: Any = jnp.float32):
        self.linear = _dense(in_features, num_classes, rngs, param_dtype)

    def __call__(self, x: Array, slope: Array | float | None = None, *,
                 dropout: Any = None, key: Array | None = None) -> Array:
        """Logits; with a ``key``, Gaussian dropout at rate ``dropout`` on the inputs."""
        del slope
        return self.linear(_dropout(_flatten(x), dropout, key, 0))


# --------------------------------------------------------------------------------------
# Losses: logits (N, K), integer labels (N,) -> scalar batch mean (mse: any shape)


def mse(predictions: Array, targets: Array) -> Array:
    """Mean squared error for regression: ``mean((predictions - targets)**2)`` over all
    elements. The shapes must match (for class labels use :func:`onehot_mse`)."""
    if jnp.shape(predictions) != jnp.shape(targets):
        raise ValueError(
            f"mse compares arrays of one shape, got {jnp.shape(predictions)} and "
            f"{jnp.shape(targets)}; for logits against integer labels use onehot_mse")
    return jnp.mean((predictions - targets) ** 2)


def onehot_mse(logits: Array, labels: Array) -> Array:
    """Squared error of logits to one-hot targets:
    ``mean_n sum_k (logits[n, k] - onehot(labels)[n, k])**2``.

    The sum runs over classes and the mean over examples (the seed's convention); divide
    by the number of classes for the per-element mean. This is the loss ``loss="mse"``
    of the classification tasks and experiments.
    """
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return jnp.mean(jnp.sum((logits - onehot) ** 2, axis=-1))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy with integer labels, averaged over examples."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: Array, labels: Array) -> Array:
    """Fraction of examples whose largest logit is at the label."""
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))


# Classification losses by config name: "mse" is the one-hot squared error.
LOSSES: dict[str, Callable[[Array, Array], Array]] = {"mse": onehot_mse, "ce": cross_entropy}


def loss_by_name(name: str) -> Callable[[Array, Array], Array]:
    """The classification loss called ``name`` in :data:`LOSSES` (``"mse"``, squared
    error to one-hot targets, or ``"ce"``)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(map(repr, LOSSES))}")
    return LOSSES[name]
