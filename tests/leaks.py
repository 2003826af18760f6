"""Searching what a run wrote for values that must not be there (credentials)."""
import os


def files_holding(roots, needles) -> list[str]:
    """Every file under ``roots`` (links not followed) whose bytes contain one of ``needles``: 'path: name'."""
    found = []
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as handle:
                        data = handle.read()
                except OSError:  # a socket or a file removed meanwhile
                    continue
                found += [f"{path}: {key}" for key, value in needles.items() if value.encode() in data]
    return found
