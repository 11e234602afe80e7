"""What the model is asked for each clip: the speech-recognition and speech-translation prompts of
Google's Gemma audio guide (ai.google.dev/gemma/docs/capabilities/audio), and how a translation's
answer is read."""

from __future__ import annotations

# ISO 639-1 codes (what OpenAI's `language` takes) of the languages most asked for; any other value is
# used as the language's name.
LANGUAGE_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "ms": "Malay", "nl": "Dutch", "no": "Norwegian",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil",
    "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}

FORMATTING = (
    "Follow these specific instructions for formatting the answer:\n"
    "* Only output the transcription, with no newlines.\n"
    "* When transcribing numbers, write the digits, i.e. write 1.7 and not one point seven, and write 3 instead of three."
)


def language_name(language: str | None) -> str | None:
    if language is None or not language.strip():
        return None
    return LANGUAGE_NAMES.get(language.strip().lower(), language.strip())


def instruction(language: str | None = None, translate_to: str | None = None, context: str | None = None) -> str:
    """The text that follows each clip. `context`: words the speech may hold (OpenAI's `prompt`)."""
    source, target = language_name(language), language_name(translate_to)
    spoken = f"in {source}" if source else "in its original language"
    if target:
        text = (f"Transcribe the following speech segment {spoken}, then translate it into {target}.\n"
                f"When formatting the answer, first output the transcription {spoken}, then one newline, "
                f"then output the string '{target}: ', then the translation in {target}.")
    else:
        text = f"Transcribe the following speech segment {spoken} into {source + ' ' if source else ''}text.\n\n{FORMATTING}"
    if context:
        text += f"\n\nThe speech may contain these words: {context.strip()}"
    return text


def answer_text(answer: str, translate_to: str | None = None) -> str:
    """A clip's text from the model's answer: for a translation, what follows '<target>: '."""
    target = language_name(translate_to)
    if target:
        marker = f"{target}: "
        at = answer.rfind(marker)
        if at >= 0:
            answer = answer[at + len(marker) :]
    return " ".join(answer.split())
