"""Class names are data: they come from folder names or from a checkpoint, either of which
anyone may have made, and are only ever printed. So a name must be printable (no control or
undecodable characters) and short, and all of them together bounded, so that a checkpoint's
manifest that keeps them stays within what a reader accepts."""

MAX_NAME = 64
MAX_NAMES_BYTES = 1 << 20


def name_problem(name) -> str | None:
    """Why `name` cannot be a class name, or None."""
    if type(name) is not str or not 1 <= len(name) <= MAX_NAME:
        return f"must be a string of 1 to {MAX_NAME} characters"
    if not name.isprintable() or name != name.strip():
        return "must be printable, without leading or trailing spaces"
    return None


def names_problem(names) -> str | None:
    """Why `names` cannot be a model's class names, or None."""
    if not isinstance(names, (list, tuple)):
        return "must be a list of class names"
    for name in names:
        problem = name_problem(name)
        if problem:
            return f"class name {_shown(name)} {problem}"
    if len(set(names)) != len(names):
        return "holds a class name twice"
    if sum(len(n.encode()) + 4 for n in names) > MAX_NAMES_BYTES:
        return f"class names take more than {MAX_NAMES_BYTES} bytes in all"
    return None


def _shown(name) -> str:
    text = repr(name)  # escapes what must not reach a terminal as is
    return text if len(text) <= 80 else text[:77] + "..."


def renamed(trained, now) -> str | None:
    """How the class names `now` differ from those a checkpoint was `trained` on, naming the
    first class that differs; None if they do not (or `trained` has none to compare)."""
    now = tuple(now or ())
    if trained is None or tuple(trained) == now:
        return None
    k = next((i for i, (a, b) in enumerate(zip(trained, now)) if a != b),
             min(len(trained), len(now)))
    was = repr(trained[k]) if k < len(trained) else "no name"
    is_now = repr(now[k]) if k < len(now) else "no name"
    return f"class {k} was trained as {was}, the data names it {is_now}"
