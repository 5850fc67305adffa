"""RELIABILITY.md stays true: every test it cites exists."""
import fnmatch
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_names(path):
    with open(path) as f:
        return set(re.findall(r"^(?:    )?def (test_\w+)", f.read(), flags=re.M))


def test_every_cited_test_exists():
    with open(os.path.join(REPO, "RELIABILITY.md")) as f:
        text = f.read()
    cited = 0
    missing = []
    # A cell cites `test_file.py::name` and then, in the same cell, further `name`s of that file.
    for cell in text.split("|"):
        current = None
        for token in re.findall(r"`([^`]+)`", cell):
            match = re.fullmatch(r"(test_[\w{},]+\.py)(?:::(\S+))?", token)
            if match:
                files, name = match.group(1), match.group(2)
                current = _expand(files)
            elif current and re.fullmatch(r"test_[\w*/\[\]]+", token):
                name = token
            else:
                continue
            for path in current:
                full = os.path.join(REPO, "tests", path)
                if not os.path.exists(full):
                    missing.append(path)
                    continue
                if name is None:
                    continue
                patterns = [p.split("[")[0] for p in name.split("/")]
                names = _test_names(full)
                if not any(fnmatch.filter(names, p) for p in patterns):
                    missing.append(f"{path}::{name}")
                cited += 1
    assert cited > 40
    assert not missing, f"RELIABILITY.md cites tests that do not exist: {missing}"


def _expand(files):
    """test_{a,b}.py -> [test_a.py, test_b.py]."""
    match = re.search(r"\{([^}]*)\}", files)
    if not match:
        return [files]
    return [files[: match.start()] + part + files[match.end():] for part in match.group(1).split(",")]
