"""The Gemma 3n vision tower: timm's MobileNet v5 encoder (`mobilenetv5_300m_enc`) in MLX.

Follows timm's `mobilenetv5.py` and the MobileNet v4 blocks it builds on, with the same parameter
names (`timm_model.blocks.2.9.attn.key.down_conv.weight`, ...). Arrays are NHWC throughout; conv
weights are OHWI (see `VisionTower.sanitize`). All norms are timm's RmsNorm2d (no BatchNorm), all
activations tanh-GELU, all convolutions TF-style 'same' padded.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import Gemma3nError

# timm's block strings: type, a/k = start/middle depthwise kernel (0: none), s = stride, e = expansion,
# c = output channels; for "mqa": h = heads, d = key/value dim, v = key/value downsampling stride.
ARCHITECTURES = {
    "mobilenetv5_300m_enc": [
        ["er_k3_s2_e4_c128"] + ["er_k3_s1_e4_c128"] * 2,
        ["uir_a3_k5_s2_e6_c256", "uir_a5_k0_s1_e4_c256", "uir_a3_k0_s1_e4_c256"]
        + ["uir_a5_k0_s1_e4_c256", "uir_a3_k0_s1_e4_c256"],
        ["uir_a5_k5_s2_e6_c640"]
        + ["uir_a5_k0_s1_e4_c640"] * 7
        + ["uir_a0_k0_s1_e1_c640"]
        + ["mqa_k3_h12_v2_s1_d64_c640", "uir_a0_k0_s1_e2_c640"] * 14,
        ["uir_a5_k5_s2_e6_c1280"] + ["mqa_k3_h16_s1_d96_c1280", "uir_a0_k0_s1_e2_c1280"] * 19,
    ]
}
STEM_CHANNELS = 64
OUTPUT_CHANNELS = 2048
OUTPUT_RESOLUTION = 16
MSFA_STAGES = (2, 3)  # the MSFA fuses the outputs of the last two stages
EPS = 1e-6


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's channel rounding: nearest multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def parse_block(spec: str) -> tuple[str, dict[str, int]]:
    kind, *options = spec.split("_")
    return kind, {option[0]: int(option[1:]) for option in options}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (timm's pad_same): the extra pixel of an odd total goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2d(nn.Module):
    """A 'same'-padded convolution; `depthwise` gives one group per channel. Weight (O, kH, kW, I/groups)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, depthwise=False, bias=False):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.groups = in_ch if depthwise else 1
        self.weight = mx.zeros((out_ch, kernel, kernel, in_ch // self.groups))
        if bias:
            self.bias = mx.zeros((out_ch,))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.convolve(x, self.weight.astype(x.dtype))
        return y + self.bias.astype(x.dtype) if "bias" in self else y

    def convolve(self, x: mx.array, weight: mx.array) -> mx.array:
        if self.pointwise:
            return x @ weight.reshape(weight.shape[0], -1).T
        return mx.conv_general(x, weight, stride=self.stride, padding=self.padding(x), groups=self.groups)

    @property
    def pointwise(self) -> bool:
        return self.kernel == 1 and self.stride == 1

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine") -> nn.Module:
        """A pointwise convolution is a Linear over the channels (the last axis): nn.quantize makes
        it a QuantizedLinear with the same parameter names (weight, scales, biases, bias)."""
        if not self.pointwise:
            raise Gemma3nError(f"only pointwise convolutions quantize, not a {self.kernel}x{self.kernel} one")
        out_ch, in_ch = self.weight.shape[0], self.weight.shape[-1]
        linear = nn.Linear(in_ch, out_ch, bias="bias" in self)
        linear.weight = self.weight.reshape(out_ch, in_ch)
        if "bias" in self:
            linear.bias = self.bias
        return nn.QuantizedLinear.from_linear(linear, group_size, bits, mode=mode)

    def padding(self, x: mx.array) -> tuple[list[int], list[int]]:
        (top, bottom), (left, right) = (same_padding(n, self.kernel, self.stride) for n in x.shape[1:3])
        return [top, left], [bottom, right]


class RmsNorm2d(nn.Module):
    """RMS norm over the channels (the last axis here), scaled by `weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), EPS)


class ConvNormAct(nn.Module):
    def __init__(self, in_ch, out_ch, kernel, stride=1, depthwise=False, bias=False, act=True):
        super().__init__()
        self.conv = Conv2d(in_ch, out_ch, kernel, stride, depthwise, bias)
        self.bn = RmsNorm2d(out_ch)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        x = self.bn(self.conv(x))
        return nn.gelu_approx(x) if self.act else x


class LayerScale2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma.astype(x.dtype)


class EdgeResidual(nn.Module):
    """Fused MBConv: a full k x k expansion conv, then a 1x1 projection."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expansion: float):
        super().__init__()
        mid = make_divisible(in_ch * expansion)
        self.conv_exp = Conv2d(in_ch, mid, kernel, stride)
        self.bn1 = RmsNorm2d(mid)
        self.conv_pwl = Conv2d(mid, out_ch, 1)
        self.bn2 = RmsNorm2d(out_ch)
        self.has_skip = in_ch == out_ch and stride == 1

    def __call__(self, x: mx.array) -> mx.array:
        y = self.bn2(self.conv_pwl(nn.gelu_approx(self.bn1(self.conv_exp(x)))))
        return y + x if self.has_skip else y


class UniversalInvertedResidual(nn.Module):
    """Optional depthwise conv, 1x1 expansion, optional depthwise conv, 1x1 projection, layer scale.

    The stride sits on the middle depthwise conv when there is one, else on the start one."""

    def __init__(self, in_ch, out_ch, start_kernel, mid_kernel, stride, expansion, layer_scale=True, skip=True):
        super().__init__()
        mid = make_divisible(in_ch * expansion)
        self.dw_start = None
        if start_kernel:
            start_stride = 1 if mid_kernel else stride
            self.dw_start = ConvNormAct(in_ch, in_ch, start_kernel, start_stride, depthwise=True, act=False)
        self.pw_exp = ConvNormAct(in_ch, mid, 1)
        self.dw_mid = ConvNormAct(mid, mid, mid_kernel, stride, depthwise=True) if mid_kernel else None
        self.pw_proj = ConvNormAct(mid, out_ch, 1, act=False)
        self.layer_scale = LayerScale2d(out_ch) if layer_scale else None
        self.has_skip = skip and in_ch == out_ch and stride == 1

    def __call__(self, x: mx.array) -> mx.array:
        y = self.dw_start(x) if self.dw_start is not None else x
        y = self.pw_exp(y)
        if self.dw_mid is not None:
            y = self.dw_mid(y)
        y = self.pw_proj(y)
        if self.layer_scale is not None:
            y = self.layer_scale(y)
        return y + x if self.has_skip else y


class Projection(nn.Module):
    """A 1x1 projection, after a strided depthwise conv + norm when `stride` > 1 (key/value downsampling)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        if stride > 1:
            self.down_conv = Conv2d(in_ch, in_ch, kernel, stride, depthwise=True)
            self.norm = RmsNorm2d(in_ch)
        self.proj = Conv2d(in_ch, out_ch, 1)

    def __call__(self, x: mx.array) -> mx.array:
        if "down_conv" in self:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class MultiQueryAttention2d(nn.Module):
    """Attention over all pixels: `num_heads` query heads share one key and one value head, whose pixels
    may be downsampled by `kv_stride`."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, kernel: int, kv_stride: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.query = Projection(dim, num_heads * head_dim)
        self.key = Projection(dim, head_dim, kernel, kv_stride)
        self.value = Projection(dim, head_dim, kernel, kv_stride)
        self.output = Projection(num_heads * head_dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, _ = x.shape
        q = self.query(x).reshape(batch, -1, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.key(x).reshape(batch, 1, -1, self.head_dim)
        v = self.value(x).reshape(batch, 1, -1, self.head_dim)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.output(o.transpose(0, 2, 1, 3).reshape(batch, height, width, -1))


class MobileAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, kernel: int, kv_stride: int):
        super().__init__()
        self.norm = RmsNorm2d(dim)
        self.attn = MultiQueryAttention2d(dim, num_heads, head_dim, kernel, kv_stride)
        self.layer_scale = LayerScale2d(dim)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.layer_scale(self.attn(self.norm(x)))


def make_block(kind: str, o: dict[str, int], in_ch: int, out_ch: int) -> nn.Module:
    if kind == "er":
        return EdgeResidual(in_ch, out_ch, o["k"], o["s"], o["e"])
    if kind == "uir":
        return UniversalInvertedResidual(in_ch, out_ch, o["a"], o["k"], o["s"], o["e"])
    return MobileAttention(in_ch, o["h"], o["d"], o["k"], o.get("v", 1))


def resize_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """torch's F.interpolate(mode="nearest"): source index floor(dst * in / out)."""
    for axis, out in zip((1, 2), size):
        source = np.floor(np.arange(out) * (x.shape[axis] / out)).astype(np.int32)
        x = mx.take(x, mx.array(np.minimum(source, x.shape[axis] - 1)), axis=axis)
    return x


class MultiScaleFusionAdapter(nn.Module):
    """Upsamples the coarser feature map to the finer one, concatenates, runs a 1x1 inverted-residual FFN,
    average-pools to 16 x 16 and norms."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.ffn = UniversalInvertedResidual(in_ch, OUTPUT_CHANNELS, 0, 0, 1, 2.0, layer_scale=False, skip=False)
        self.norm = RmsNorm2d(OUTPUT_CHANNELS)

    def __call__(self, features: list[mx.array]) -> mx.array:
        high = features[0].shape[1:3]
        if any(n % OUTPUT_RESOLUTION for n in high):
            raise Gemma3nError(
                f"the vision tower needs images whose sides are multiples of 256 pixels (features {high[0]}x{high[1]})"
            )
        x = mx.concatenate([resize_nearest(f, high) if f.shape[1:3] != high else f for f in features], axis=-1)
        x = self.ffn(x)
        ph, pw = high[0] // OUTPUT_RESOLUTION, high[1] // OUTPUT_RESOLUTION
        if ph > 1 or pw > 1:
            batch, _, _, channels = x.shape
            x = x.reshape(batch, OUTPUT_RESOLUTION, ph, OUTPUT_RESOLUTION, pw, channels).mean(axis=(2, 4))
        return self.norm(x)


class MobileNetV5Encoder(nn.Module):
    def __init__(self, architecture: list[list[str]], multiplier: float = 1.0):
        super().__init__()
        # timm rounds the stem width by the multiplier only when the multiplier is >= 1
        stem = STEM_CHANNELS if multiplier < 1.0 else make_divisible(STEM_CHANNELS * multiplier)
        self.conv_stem = ConvNormAct(3, stem, 3, 2, bias=True)
        self.blocks, channels, stage_channels = [], stem, []
        for stage in architecture:
            blocks = []
            for spec in stage:
                kind, options = parse_block(spec)
                out_ch = make_divisible(options["c"] * multiplier)
                blocks.append(make_block(kind, options, channels, out_ch))
                channels = out_ch
            self.blocks.append(blocks)
            stage_channels.append(channels)
        self.msfa = MultiScaleFusionAdapter(sum(stage_channels[i] for i in MSFA_STAGES))

    def __call__(self, x: mx.array, capture: dict | None = None) -> mx.array:
        """The (B, 16, 16, 2048) feature map. `capture`, when given, receives the NHWC values after the
        stem ("stem"), after each stage ("stage0" .. "stage3") and after the MSFA ("msfa")."""
        stem = x = self.conv_stem(x)
        stages = []
        for stage in self.blocks:
            for block in stage:
                x = block(x)
            stages.append(x)
        features = self.msfa([stages[i] for i in MSFA_STAGES])
        if capture is not None:
            capture.update(stem=stem, msfa=features, **{f"stage{i}": out for i, out in enumerate(stages)})
        return features


class VisionTower(nn.Module):
    """Images -> soft tokens, ready for `MultimodalEmbedder.embed_soft`.

    Built from the `vision_config` of config.json. Input: pixel values (B, H, W, 3) NHWC in [0, 1]
    (see `image.preprocess_image`; H = W = 768 for Gemma 3n). Output: (B, 256, 2048), the encoder's
    16 x 16 feature map in row-major pixel order, multiplied by sqrt(2048) as Transformers'
    `get_image_features` does before the embedder. Computes in float32 when the weights are float16
    (float16 overflows in these convolutions), else in the weights' dtype.
    """

    def __init__(self, config: dict):
        super().__init__()
        name = config.get("architecture", "mobilenetv5_300m_enc")
        if name not in ARCHITECTURES:
            raise Gemma3nError(f"unsupported vision tower architecture '{name}' (supported: {', '.join(ARCHITECTURES)})")
        model_args = dict(config.get("model_args") or {})
        multiplier = model_args.pop("channel_multiplier", 1.0)
        if model_args:
            raise Gemma3nError(f"unsupported vision tower model_args: {', '.join(model_args)}")
        self.hidden_size = config.get("hidden_size", OUTPUT_CHANNELS)
        if self.hidden_size != OUTPUT_CHANNELS:
            raise Gemma3nError(f"vision hidden_size must be {OUTPUT_CHANNELS}, got {self.hidden_size}")
        self.timm_model = MobileNetV5Encoder(ARCHITECTURES[name], multiplier)

    def __call__(self, pixel_values: mx.array, capture: dict | None = None) -> mx.array:
        """Soft tokens (B, 256, 2048); `capture` as in `MobileNetV5Encoder.__call__`."""
        dtype = self.timm_model.conv_stem.conv.weight.dtype
        x = pixel_values.astype(mx.float32 if dtype == mx.float16 else dtype)
        features = self.timm_model(x, capture)
        return features.reshape(x.shape[0], -1, self.hidden_size) * math.sqrt(self.hidden_size)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """PyTorch conv weights (O, I, kH, kW) -> MLX (O, kH, kW, I); other tensors unchanged.

        The layout is decided for the whole dict, so pass all the tower's weights at once: kernels are
        square, so a tensor with shape[2] == shape[3] != shape[1] is PyTorch-only (the 3x3 stem over 3
        channels reads the same both ways). A dict already in MLX layout is returned unchanged.
        """
        convs = [w for w in weights.values() if w.ndim == 4]
        if not any(w.shape[2] == w.shape[3] != w.shape[1] for w in convs):
            return dict(weights)
        return {name: w.transpose(0, 2, 3, 1) if w.ndim == 4 else w for name, w in weights.items()}
