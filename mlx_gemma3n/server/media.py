"""The images, audio clips and videos of a request: `data:` URLs, base64 `input_audio`, and (only when
the server allows it) remote http(s) images and videos. A request never names a local file.

A remote image or video is fetched only from a public address unless the server allows private ones: the
address is checked on the connection itself, after the name is resolved, and again for each
redirect, so a name that re-resolves to 127.0.0.1 between a check and the fetch gets nowhere
(server-side request forgery into the user's own machine and network)."""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image

from ..errors import Gemma3nError
from ..inputs.audio_files import SoundTooLong, decode_audio
from ..inputs.image import load_image, open_image
from ..inputs.video import Video, load_video
from .errors import ApiError, bad_request

DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)
IMAGE_MIME_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
VIDEO_MIME_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/mpeg", "video/ogg", "video/x-msvideo")
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a", "webm")  # the last two through FFmpeg (PyAV)


@dataclass
class MediaLimits:
    max_images: int = 8
    max_audio_seconds: float = 600.0
    allow_remote: bool = False
    remote_timeout: float = 10.0
    remote_max_bytes: int = 16 << 20
    allow_private: bool = False  # remote media from loopback, private, link-local... addresses
    max_image_pixels: int = 50_000_000  # a video's frames too
    video_fps: float = 1.0  # frames sampled per second of a video, at most
    max_video_frames: int = 8  # frames sampled per video, at most (each counts as an image)


def decode_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64", param) from None


def url_bytes(url: str, param: str, limits: MediaLimits, kind: str, mime_types) -> bytes:
    """The bytes an `image_url.url` or `video_url.url` names: a base64 data URL of one of `mime_types`
    (a `kind`), or http(s) when allowed."""
    match = DATA_URL.fullmatch(url) if url.startswith("data:") else None
    if match:
        mime = match["mime"].lower()
        if mime not in mime_types:
            raise bad_request(f"{param}: {kind}s must be {', '.join(sorted(set(mime_types)))}, not '{mime}'", param)
        return decode_base64(match["data"], param)
    if url.startswith("data:"):
        raise bad_request(f"{param}: a data URL must be base64 (data:{next(iter(mime_types))};base64,...)", param)
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise bad_request(f"{param}: remote {kind} URLs are off (start the server with --allow-remote-media)", param)
        return fetch_remote(url, param, limits)
    raise bad_request(f"{param} must be a data: URL (or http(s) with --allow-remote-media); local paths are refused", param)


def image_from_url(url: str, param: str, limits: MediaLimits) -> Image.Image:
    """A decoded RGB image from an `image_url.url`: a base64 data URL, or http(s) when allowed."""
    data = url_bytes(url, param, limits, "image", IMAGE_MIME_TYPES)
    try:
        image = open_image(io.BytesIO(data), param, limits.max_image_pixels)
        if image.format not in IMAGE_MIME_TYPES.values():
            raise Gemma3nError(f"{param} is a {image.format} image; png, jpeg, webp and gif are taken")
        return load_image(image)
    except Gemma3nError as exc:
        raise bad_request(str(exc), param) from None


def video_from_url(url: str, param: str, limits: MediaLimits, sampling_rate: int) -> Video:
    """The sampled frames and the sound of a `video_url.url` (a base64 data URL, or http(s) when allowed),
    at the server's frame rate and frame count."""
    data = url_bytes(url, param, limits, "video", VIDEO_MIME_TYPES)
    try:
        return load_video(data, limits.video_fps, limits.max_video_frames, sampling_rate, limits.max_image_pixels,
                          max_sound_seconds=limits.max_audio_seconds)
    except Gemma3nError as exc:
        raise media_error(exc, param) from None


def media_error(error: Gemma3nError, param: str) -> ApiError:
    """413 for sound past the server's limit (SoundTooLong), else 400; both naming `param`."""
    if isinstance(error, SoundTooLong):
        return ApiError(413, f"{param}: {error} (the server's --max-audio-seconds)", param)
    return bad_request(f"{param}: {error}", param)


class WebRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect to http(s) only (urllib would follow ftp too, past the address check); the
    connection it opens is checked as the first one was."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme
        if scheme not in ("http", "https"):
            raise urllib.error.URLError(f"a redirect to {newurl} refused: http and https only")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def non_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast or ip.is_reserved


def public_connection(host: str, port: int, timeout: float) -> socket.socket:
    """A socket to the first address `host` resolves to, refused when any of them is not public."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise urllib.error.URLError(f"cannot resolve {host}: {exc.strerror}") from None
    refused = sorted({info[4][0] for info in addresses if non_public(info[4][0])})
    if refused:
        raise urllib.error.URLError(f"{host} resolves to a non-public address ({', '.join(refused)}); "
                                    "the server refuses those unless started with --allow-private-media")
    family, kind, proto, _, address = addresses[0]
    sock = socket.socket(family, kind, proto)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


class PublicHTTPConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = public_connection(self.host, self.port, self.timeout)


class PublicHTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        sock = public_connection(self.host, self.port, self.timeout)
        self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)


class PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(PublicHTTPConnection, req)


class PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(PublicHTTPSConnection, req)


def fetch_remote(url: str, param: str, limits: MediaLimits) -> bytes:
    handlers = [WebRedirects] + ([] if limits.allow_private else [PublicHTTPHandler, PublicHTTPSHandler])
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=limits.remote_timeout) as response:
            data = response.read(limits.remote_max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise bad_request(f"{param}: cannot download {url}: {getattr(exc, 'reason', exc)}", param) from None
    if len(data) > limits.remote_max_bytes:
        raise bad_request(f"{param}: {url} is over {limits.remote_max_bytes} bytes", param)
    return data


def audio_from_part(part: dict, param: str, sampling_rate: int, max_seconds: float):
    """The mono samples of an `input_audio` part {data: base64, format: one of AUDIO_FORMATS}; decoding stops
    past `max_seconds` (413)."""
    if not isinstance(part, dict):
        raise bad_request(f"{param} must be an object with 'data' and 'format'", param)
    audio_format, data = part.get("format"), part.get("data")
    if audio_format not in AUDIO_FORMATS:
        raise bad_request(f"{param}.format must be one of {', '.join(AUDIO_FORMATS)}", f"{param}.format")
    if not isinstance(data, str):
        raise bad_request(f"{param}.data must be a base64 string", f"{param}.data")
    try:
        return decode_audio(io.BytesIO(decode_base64(data, f"{param}.data")), f"the {audio_format} file", sampling_rate, max_seconds)
    except Gemma3nError as exc:
        raise media_error(exc, f"{param}.data") from None
