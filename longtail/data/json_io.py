"""Reading the json files users hand us, with errors that name the file and say what to do."""
import json
import os


def read_json_object(path: str, what: str, missing_hint: str) -> dict:
    """Load ``path`` and check that it holds a json object.

    Args:
        path: the file.
        what: how the file is named in messages, e.g. "Class statistics file".
        missing_hint: what to do when the file does not exist.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not valid json, or its top level is not an object.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist. {missing_hint}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid json ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(
            f"{what} {path!r} holds a json {type(data).__name__}, not a json object (is it a "
            "detection results file?)."
        )
    return data
