"""The checkpoint's own preprocessing settings: Transformers' Gemma3nAudioFeatureExtractor and
SiglipImageProcessor (torchvision backend) built at non-default settings, saved into a model folder
with save_pretrained (Transformers 5's nested processor_config.json, or the flat preprocessor_config.json
of Transformers 4 and Google's files), read back by our Processor: features and pixels equal theirs.
Unsupported settings are one-line errors; an audio tower of 32 mel bins runs an audio prompt end to
end, greedy tokens equal to Transformers' generate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile
import soxr
from PIL import Image
from reference import build_checkpoint, build_tokenizer, reference_greedy, reference_image_processor

from mlx_gemma3n import Gemma3nError, load
from mlx_gemma3n.generate import prepare_prompt, stream_generate
from mlx_gemma3n.inputs.audio_features import GEMMA3N_AUDIO
from mlx_gemma3n.inputs.audio_files import load_audio
from mlx_gemma3n.inputs.image import GEMMA3N_IMAGE
from mlx_gemma3n.inputs.processor import Processor

RATE = 16_000


def clip(num_samples: int, rate: int = RATE, seed: int = 0) -> np.ndarray:
    t = np.arange(num_samples) / rate
    rng = np.random.default_rng(seed)
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((180, 420, 1100, 2600), start=1))
    return (0.3 * voice + 0.02 * rng.standard_normal(num_samples)).astype(np.float32)


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    return folder, build_tokenizer(folder)


def model_folder(tokenizer_files, destination, extractor=None, image_processor=None, layout="nested"):
    """A folder with the tiny tokenizer and the processor configs Transformers saves for these parts
    (its defaults for a part not given): "nested" as Gemma3nProcessor.save_pretrained writes them,
    "flat" as one preprocessor_config.json holding both parts."""
    from transformers import Gemma3nProcessor
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    source, tokenizer = tokenizer_files
    shutil.copytree(source, destination, dirs_exist_ok=True)
    extractor = extractor or Gemma3nAudioFeatureExtractor()
    image_processor = image_processor or reference_image_processor()
    if layout == "nested":
        saved = destination / "saved"
        Gemma3nProcessor(extractor, image_processor, tokenizer).save_pretrained(saved)
        shutil.copyfile(saved / "processor_config.json", destination / "processor_config.json")
    else:
        flat = {}
        for name, part in (("extractor", extractor), ("images", image_processor)):
            part.save_pretrained(destination / name)
            flat.update(json.loads((destination / name / "preprocessor_config.json").read_text()))
        (destination / "preprocessor_config.json").write_text(json.dumps(flat))
    return destination


# --- audio ---

AUDIO_SETTINGS = {
    "32 mel bins": dict(feature_size=32),
    "20 ms frames, 8 ms hops": dict(frame_length_ms=20.0, hop_length_ms=8.0),
    "per-bin normalisation": dict(
        feature_size=32, per_bin_mean=list(np.linspace(-3.0, 1.0, 32)), per_bin_stddev=list(np.linspace(0.5, 2.5, 32))
    ),
    "plain preemphasis, no overdrive": dict(preemphasis_htk_flavor=False, fft_overdrive=False),
    "no preemphasis": dict(preemphasis=0.0),
    "8 kHz, other band, floor, scale, padding": dict(
        sampling_rate=8_000, min_frequency=60.0, max_frequency=3_800.0, mel_floor=1e-3, input_scale_factor=2.5,
        padding_value=0.25,
    ),
    "short frames": dict(frame_length_ms=2.0, hop_length_ms=1.0),  # frames starting in the padding: mask False
}


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize("name", list(AUDIO_SETTINGS))
def test_audio_features_equal_transformers_extractor(tokenizer_files, tmp_path, name, layout):
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    extractor = Gemma3nAudioFeatureExtractor(**AUDIO_SETTINGS[name])
    processor = Processor(model_folder(tokenizer_files, tmp_path, extractor=extractor, layout=layout))
    assert processor.audio_settings != GEMMA3N_AUDIO
    for num_samples in (extractor.sampling_rate + 77, 3_001):
        audio = clip(num_samples, extractor.sampling_rate, seed=num_samples)
        ref = extractor(audio, return_tensors="np")
        features, valid = processor.audio_features(audio)
        assert features.shape == ref["input_features"][0].shape and features.shape[1] == extractor.feature_size
        np.testing.assert_array_equal(valid, ref["input_features_mask"][0])
        np.testing.assert_array_equal(features, ref["input_features"][0])
    if name == "short frames":
        assert not valid.all(), "no frame starts in the padding: the mask's False side is not tested"


def test_audio_files_are_resampled_to_the_extractor_rate(tokenizer_files, tmp_path):
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    extractor = Gemma3nAudioFeatureExtractor(sampling_rate=8_000)
    processor = Processor(model_folder(tokenizer_files, tmp_path, extractor=extractor))
    soundfile.write(tmp_path / "clip.wav", clip(2 * RATE), RATE, subtype="FLOAT")
    at_8k = soxr.resample(clip(2 * RATE), RATE, 8_000, quality="HQ").astype(np.float32)
    np.testing.assert_array_equal(load_audio(tmp_path / "clip.wav", 8_000), at_8k)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "clip.wav")}]}]
    _, [(features, valid)] = processor.load_media(messages)
    np.testing.assert_array_equal(features, extractor(at_8k, return_tensors="np")["input_features"][0])


# --- images ---

IMAGE_SETTINGS = {
    "bicubic 96 x 80": dict(size={"height": 96, "width": 80}, resample=3),
    "lanczos 64": dict(size={"height": 64, "width": 64}, resample=1),
    "nearest 50 x 210": dict(size={"height": 50, "width": 210}, resample=0),
    "normalised": dict(size={"height": 72, "width": 72}, resample=2, do_normalize=True,
                       image_mean=[0.3, 0.45, 0.6], image_std=[0.7, 0.2, 0.35]),
    "normalised, not rescaled": dict(size={"height": 40, "width": 56}, do_rescale=False, do_normalize=True,
                                     image_mean=[100.0, 120.5, 90.25], image_std=[60.0, 70.5, 3.0]),
    "other rescale": dict(size={"height": 48, "width": 48}, resample=2, rescale_factor=1 / 127.5, do_normalize=False),
    "raw": dict(size={"height": 33, "width": 65}, do_rescale=False, do_normalize=False),
}


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize("name", list(IMAGE_SETTINGS))
def test_image_pixels_equal_transformers_processor(tokenizer_files, tmp_path, name, layout):
    from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

    image_processor = SiglipImageProcessor(**{"resample": 2, "do_normalize": False, **IMAGE_SETTINGS[name]})
    processor = Processor(model_folder(tokenizer_files, tmp_path, image_processor=image_processor, layout=layout))
    assert processor.image_settings != GEMMA3N_IMAGE
    for image in (picture(123, 157), picture(31, 20, seed=1)):
        ref = image_processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = processor.image_pixels(image)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)


def test_rgb_images_only_without_rgb_conversion(tokenizer_files, tmp_path):
    from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2, do_normalize=False, do_convert_rgb=False)
    processor = Processor(model_folder(tokenizer_files, tmp_path, image_processor=image_processor))
    image = picture(40, 50)
    ref = image_processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(processor.image_pixels(image), ref)
    with pytest.raises(Gemma3nError, match="do_convert_rgb"):
        processor.image_pixels(image.convert("L"))


# --- defaults ---


@pytest.mark.parametrize("layout", ["nested", "flat", "none"])
def test_gemma3n_values_and_no_file_give_the_defaults(tokenizer_files, tmp_path, layout):
    """Google's values (Transformers' extractor defaults, the published image settings), saved either
    way, or no processor config at all: the settings the rest of the suite checks against Transformers."""
    if layout == "none":
        shutil.copytree(tokenizer_files[0], tmp_path, dirs_exist_ok=True)
        folder = tmp_path
    else:
        folder = model_folder(tokenizer_files, tmp_path, layout=layout)
    processor = Processor(folder)
    assert processor.audio_settings == GEMMA3N_AUDIO and processor.image_settings == GEMMA3N_IMAGE


# --- refusals ---


def write_entries(folder, layout: str, part: str, entries: dict):
    """Google's flat file with `entries` set in it, or a nested processor_config.json of `entries` only."""
    if layout == "flat":
        path = folder / "preprocessor_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))
    else:
        path = folder / "processor_config.json"
        path.write_text(json.dumps({part: entries}))
    return path


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize(
    "part, entries, problem",
    [
        ("feature_extractor", {"dither": 1e-4}, "not supported"),
        ("feature_extractor", {"padding_side": "left"}, "not supported"),
        ("feature_extractor", {"pad_to_multiple_of": 256}, "not supported"),
        ("feature_extractor", {"max_length": 960_000}, "not supported"),
        ("feature_extractor", {"feature_extractor_type": "WhisperFeatureExtractor"}, "not supported"),
        ("feature_extractor", {"fft_length": 2048}, "disagrees"),
        ("feature_extractor", {"frame_length": 512, "frame_length_ms": 25.0}, "disagrees"),
        ("feature_extractor", {"per_bin_mean": [0.0] * 3}, "holds 3 numbers"),
        ("feature_extractor", {"per_bin_stddev": [0.0] * 128}, "zero"),
        ("feature_extractor", {"feature_size": "many"}, "not a positive integer"),
        ("feature_extractor", {"mel_floor": 0.0}, "positive"),
        ("image_processor", {"resample": 4}, "not supported"),
        ("image_processor", {"resample": 5}, "not supported"),
        ("image_processor", {"size": {"shortest_edge": 224}}, "not supported"),
        ("image_processor", {"size": 224}, "not supported"),
        ("image_processor", {"do_resize": False}, "not supported"),
        ("image_processor", {"do_center_crop": True}, "not supported"),
        ("image_processor", {"image_processor_type": "SiglipImageProcessorPil"}, "not supported"),
        ("image_processor", {"image_std": [0.5, 0.0, 0.5]}, "zero"),
        ("image_processor", {"image_mean": [0.5, 0.5]}, "holds 2 numbers"),
        ("image_processor", {"do_normalize": "yes"}, "not true or false"),
    ],
)
def test_unsupported_settings_are_one_line_errors(tokenizer_files, tmp_path, layout, part, entries, problem):
    path = write_entries(model_folder(tokenizer_files, tmp_path, layout="flat"), layout, part, entries)
    with pytest.raises(Gemma3nError, match=problem) as error:
        Processor(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and all(key in message for key in entries)


def test_audio_tower_and_extractor_must_agree(tokenizer_files, tmp_path):
    shutil.copytree(tokenizer_files[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"audio_config": {"input_feat_size": 32}}))
    with pytest.raises(Gemma3nError, match="input_feat_size"):
        Processor(tmp_path).audio_features(clip(RATE))


def test_clips_the_tower_cannot_take_are_refused(tokenizer_files, tmp_path):
    """8 ms hops: 30 s give 235 soft tokens, over the 188 the model holds for a clip."""
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    folder = model_folder(tokenizer_files, tmp_path, extractor=Gemma3nAudioFeatureExtractor(hop_length_ms=8.0))
    (folder / "config.json").write_text(json.dumps({"audio_config": {}, "audio_soft_tokens_per_image": 188}))
    processor = Processor(folder)
    twenty_seconds = clip(20 * RATE)
    frames = Gemma3nAudioFeatureExtractor(hop_length_ms=8.0)(twenty_seconds)["input_features"][0].shape[0]
    assert processor.audio_features(twenty_seconds)[0].shape[0] == frames
    with pytest.raises(Gemma3nError, match="235 soft tokens"):
        processor.audio_features(clip(30 * RATE))


# --- end to end ---


@pytest.fixture(scope="module")
def checkpoint_32_bins(tmp_path_factory, tokenizer_files):
    """A tiny checkpoint whose audio tower takes 32 mel bins, with Transformers' processor for it."""
    from transformers import Gemma3nProcessor
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    folder = tmp_path_factory.mktemp("bins32")
    model = build_checkpoint(folder, seed=3, audio_overrides={"input_feat_size": 32})
    hf_processor = Gemma3nProcessor(
        Gemma3nAudioFeatureExtractor(feature_size=32), reference_image_processor(), tokenizer_files[1],
        chat_template=(folder / "chat_template.jinja").read_text(),
    )
    saved = tmp_path_factory.mktemp("bins32_processor")
    hf_processor.save_pretrained(saved)
    shutil.copyfile(saved / "processor_config.json", folder / "processor_config.json")
    return folder, model, hf_processor


def test_audio_prompt_greedy_tokens_equal_transformers_with_32_mel_bins(checkpoint_32_bins, tmp_path):
    folder, hf_model, hf_processor = checkpoint_32_bins
    soundfile.write(tmp_path / "clip.wav", clip(2 * RATE), RATE, subtype="FLOAT")
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "clip.wav")},
                                             {"type": "text", "text": "what is this?"}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    audio = soundfile.read(tmp_path / "clip.wav", dtype="float32")[0]
    inputs = hf_processor(text=text, audio=[audio], return_tensors="pt", add_special_tokens=False)
    assert inputs["input_features"].shape[-1] == 32
    expected = reference_greedy(
        hf_model, inputs["input_ids"], 24, stop_at_eos=False,
        input_features=inputs["input_features"], input_features_mask=inputs["input_features_mask"],
    )
    model, processor = load(folder)
    assert prepare_prompt(processor, messages).ids == inputs["input_ids"][0].tolist()
    processor.eos_token_ids, model.config.eos_token_ids = set(), []
    tokens = [r.token for r in stream_generate(model, processor, messages, max_tokens=24, temperature=0.0)]
    assert tokens == expected
