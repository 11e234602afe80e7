"""The checkpoint's own preprocessing settings: the audio feature extractor's and the image processor's
entries of its processor configs, read as Transformers reads them, checked, and turned into
`AudioFeatureSettings` and `ImageSettings`.

Where the entries are (Transformers 5 looks in this order): processor_config.json's nested
"feature_extractor" (or "audio_processor") and "image_processor" objects, which
`Gemma3nProcessor.save_pretrained` writes; else preprocessor_config.json as one flat object, as
Transformers 4 and Google's published files have it. No file, an absent key or a null: Gemma 3n's
defaults (for the image processor these are Google's values, not SiglipImageProcessor's class defaults).

Frame and hop lengths: the files hold them in samples (`frame_length`, `hop_length`: what the extractor
that wrote the file computed from its `frame_length_ms` / `hop_length_ms`), and we use them; a file may
give the milliseconds instead. (Transformers' own loader drops the sample counts and recomputes them
from the milliseconds, 32 / 10 by default: a folder saved from an extractor with other lengths loads
back in Transformers with the default ones.)

Settings we cannot reproduce exactly are refused with one line naming the file and the key: dithering
(random noise), left padding, the torchvision resize modes box and hamming (torchvision has no tensor
kernel for them), sizes other than height x width, no resize, cropping and padding, and call arguments
written into the config (Transformers' extractor always pads to a multiple of 128 and cuts at 480,000
samples, whatever the file says).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import Gemma3nError
from .audio_features import GEMMA3N_AUDIO, MAX_SAMPLES, PAD_TO_MULTIPLE_OF, AudioFeatureSettings
from .image import GEMMA3N_IMAGE, RESAMPLE_MODES, ImageSettings

PROCESSOR_CONFIG, PREPROCESSOR_CONFIG = "processor_config.json", "preprocessor_config.json"
AUDIO_ENTRIES, IMAGE_ENTRIES = ("feature_extractor", "audio_processor"), ("image_processor",)
AUDIO_TYPES = {"Gemma3nAudioFeatureExtractor"}
IMAGE_TYPES = {"SiglipImageProcessor", "SiglipImageProcessorFast"}
# call arguments of Transformers' extractor -> the values it always uses
AUDIO_CALL_DEFAULTS = {
    "padding": ("longest", True),
    "pad_to_multiple_of": (PAD_TO_MULTIPLE_OF,),
    "max_length": (MAX_SAMPLES,),
    "truncation": (True,),
}


class Entries:
    """One processor's settings and where they come from, with typed, checked reads."""

    def __init__(self, raw, source: str):
        if not isinstance(raw, dict):
            raise Gemma3nError(f"{source} is not a JSON object")
        self.raw, self.source = raw, source

    def fail(self, key: str, problem: str):
        shown = repr(self.raw[key])
        shown = shown if len(shown) <= 60 else shown[:56] + " ..."
        raise Gemma3nError(f"{self.source}: {key} {shown} {problem}")

    def given(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def number(self, key: str, default: float, positive: bool = False) -> float:
        if not self.given(key):
            return default
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, "is not a number")
        if positive and value <= 0:
            self.fail(key, "must be positive")
        return float(value)

    def integer(self, key: str, default: int | None) -> int | None:
        if not self.given(key):
            return default
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(key, "is not a positive integer")
        return value

    def flag(self, key: str, default: bool) -> bool:
        if not self.given(key):
            return default
        if not isinstance(self.raw[key], bool):
            self.fail(key, "is not true or false")
        return self.raw[key]

    def numbers(self, key: str, lengths: tuple[int, ...], default=None) -> tuple[float, ...] | None:
        """A number or a list of numbers (nested lists flattened, as Transformers writes per-bin
        arrays) of one of `lengths`."""
        if not self.given(key):
            return default
        try:
            flat = np.asarray(self.raw[key], dtype=np.float64).ravel()
        except (TypeError, ValueError):
            self.fail(key, "is not a list of numbers")
        if not np.all(np.isfinite(flat)):
            self.fail(key, "holds a value that is not a finite number")
        if flat.size not in lengths:
            self.fail(key, f"holds {flat.size} numbers, not {' or '.join(map(str, lengths))}")
        return tuple(flat.tolist())

    def choice(self, key: str, choices: dict, default: int, why: str) -> int:
        """An integer code among `choices`."""
        if not self.given(key):
            return default
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
            self.fail(key, f"is not supported: {why}")
        return int(value)

    def refuse_unless(self, key: str, accepted: tuple, why: str):
        if self.given(key) and self.raw[key] not in accepted:
            self.fail(key, f"is not supported: {why}")

    def check_type(self, key: str, known: set[str]):
        if self.given(key) and (not isinstance(self.raw[key], str) or self.raw[key] not in known):
            self.fail(key, f"is not supported (known: {', '.join(sorted(known))})")


def entries_of(model_dir: Path, processor_config, preprocessor_config, names: tuple[str, ...]) -> Entries:
    if not isinstance(processor_config, dict):
        raise Gemma3nError(f"{model_dir / PROCESSOR_CONFIG} is not a JSON object")
    for name in names:
        if processor_config.get(name) is not None:
            return Entries(processor_config[name], f"{model_dir / PROCESSOR_CONFIG} ({name})")
    return Entries(preprocessor_config, str(model_dir / PREPROCESSOR_CONFIG))


def preprocessing_settings(
    model_dir: Path, processor_config: dict, preprocessor_config: dict
) -> tuple[AudioFeatureSettings, ImageSettings]:
    """The settings of a model folder, from its parsed processor_config.json and
    preprocessor_config.json ({} for a missing file)."""
    audio = entries_of(model_dir, processor_config, preprocessor_config, AUDIO_ENTRIES)
    image = entries_of(model_dir, processor_config, preprocessor_config, IMAGE_ENTRIES)
    return audio_settings(audio), image_settings(image)


def length_in_samples(entries: Entries, key: str, rate: int, default_ms: float) -> int:
    """`key` in samples, or `key`_ms converted as Transformers converts it; both given must agree."""
    given = entries.integer(key, None)
    milliseconds = entries.number(f"{key}_ms", default_ms, positive=True)
    derived = int(round(rate * milliseconds / 1000.0))
    if given is None:
        if derived < 1:
            entries.fail(f"{key}_ms", f"gives no sample at {rate} Hz")
        return derived
    if entries.given(f"{key}_ms") and given != derived:
        entries.fail(key, f"disagrees with {key}_ms {milliseconds:g} ({derived} samples at {rate} Hz)")
    return given


def audio_settings(entries: Entries) -> AudioFeatureSettings:
    default = GEMMA3N_AUDIO
    entries.check_type("feature_extractor_type", AUDIO_TYPES)
    entries.refuse_unless("dither", (0, 0.0), "dithering adds random noise to every clip")
    entries.refuse_unless("padding_side", ("right",), "clips are padded at their end only")
    for key, accepted in AUDIO_CALL_DEFAULTS.items():
        entries.refuse_unless(key, accepted, f"Transformers' extractor ignores it in its config and uses {accepted[0]!r}")
    rate = entries.integer("sampling_rate", default.sampling_rate)
    frame_length = length_in_samples(entries, "frame_length", rate, 32.0)
    hop_length = length_in_samples(entries, "hop_length", rate, 10.0)
    fft_length = 2 ** math.ceil(math.log2(frame_length)) * (2 if entries.flag("fft_overdrive", True) else 1)
    if entries.integer("fft_length", fft_length) != fft_length:
        entries.fail("fft_length", f"disagrees with frame_length {frame_length} and fft_overdrive ({fft_length})")
    feature_size = entries.integer("feature_size", default.feature_size)
    min_frequency = entries.number("min_frequency", default.min_frequency)
    max_frequency = entries.number("max_frequency", default.max_frequency)
    if not 0 <= min_frequency < max_frequency:
        raise Gemma3nError(f"{entries.source}: min_frequency {min_frequency:g} and max_frequency {max_frequency:g} leave no mel range")
    stddev = entries.numbers("per_bin_stddev", (feature_size,))
    if stddev is not None and 0.0 in stddev:
        entries.fail("per_bin_stddev", "holds a zero")
    return AudioFeatureSettings(
        feature_size=feature_size,
        sampling_rate=rate,
        frame_length=frame_length,
        hop_length=hop_length,
        fft_length=fft_length,
        min_frequency=min_frequency,
        max_frequency=max_frequency,
        preemphasis=entries.number("preemphasis", default.preemphasis),
        preemphasis_htk_flavor=entries.flag("preemphasis_htk_flavor", default.preemphasis_htk_flavor),
        mel_floor=entries.number("mel_floor", default.mel_floor, positive=True),
        input_scale_factor=entries.number("input_scale_factor", default.input_scale_factor),
        padding_value=entries.number("padding_value", default.padding_value),
        per_bin_mean=entries.numbers("per_bin_mean", (feature_size,)),
        per_bin_stddev=stddev,
    )


def image_size(entries: Entries) -> tuple[int, int]:
    if not entries.given("size"):
        return GEMMA3N_IMAGE.height, GEMMA3N_IMAGE.width
    size = entries.raw["size"]
    given = {key for key, value in size.items() if value is not None} if isinstance(size, dict) else set()
    if given != {"height", "width"} or not all(
        isinstance(size[key], int) and not isinstance(size[key], bool) and size[key] > 0 for key in given
    ):
        entries.fail("size", "is not supported: give {'height': H, 'width': W} (the vision tower takes one fixed size)")
    return size["height"], size["width"]


def image_settings(entries: Entries) -> ImageSettings:
    default = GEMMA3N_IMAGE
    entries.check_type("image_processor_type", IMAGE_TYPES)
    entries.refuse_unless("do_resize", (True,), "the vision tower takes images of one fixed size")
    entries.refuse_unless("do_center_crop", (False,), "Gemma 3n's images are resized, not cropped")
    entries.refuse_unless("do_pad", (False,), "Gemma 3n's images are resized, not padded")
    modes = ", ".join(f"{code} ({name})" for code, name in RESAMPLE_MODES.items())
    resample = entries.choice("resample", RESAMPLE_MODES, default.resample, f"torchvision resizes tensors with {modes} only")
    height, width = image_size(entries)
    std = entries.numbers("image_std", (1, 3), default.image_std)
    if 0.0 in std:
        entries.fail("image_std", "holds a zero")
    return ImageSettings(
        height=height,
        width=width,
        resample=resample,
        do_rescale=entries.flag("do_rescale", default.do_rescale),
        rescale_factor=entries.number("rescale_factor", default.rescale_factor, positive=True),
        do_normalize=entries.flag("do_normalize", default.do_normalize),
        image_mean=entries.numbers("image_mean", (1, 3), default.image_mean),
        image_std=std,
        do_convert_rgb=entries.flag("do_convert_rgb", default.do_convert_rgb),
    )
