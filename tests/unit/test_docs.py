"""The README is a door and the documentation site is whole; every command the docs show is real.

- README.md stays short (at most 200 lines) and shows the four commands of the workflow (train a seg
  model, train an image model, generate, evaluate) on its first screen;
- every page in docs/ is in mkdocs.yml's nav and every nav entry is a page (``make docs`` builds the
  site with ``--strict``, which checks the links inside docs/; the README's links are checked here);
- every medgen command line of README.md and docs/*.md, in code blocks and inline code, is accepted:
  its Hydra overrides compose and validate with the config of its command (``medgen-train``,
  ``medgen-lr-find``, ``medgen-generate``, ``medgen-evaluate``, also through ``python -m``, ``torchrun``
  and the SLURM templates) and set no key the run would not use; its flags are those of the command's
  parser (``medgen-data``, ``medgen-augment``, ``medgen-demo``), and a complete command line parses;
  every ``make`` target exists and every benchmark script shown is a file.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
TEXTS = [README, *PAGES]

FIRST_SCREEN = 60
WORKFLOW = {
    "train a seg model": r"medgen-train mode=seg\b",
    "train an image model": r"medgen-train mode=(bravo|dual)\b",
    "generate": r"medgen-generate seg_checkpoint=\S+ image_checkpoint=",
    "evaluate": r"medgen-evaluate real_dir=\S+ synthetic_dir=",
}


# ============================================================================ the README, the site
def test_the_readme_is_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the detail to a page of docs/"


@pytest.mark.parametrize("step", list(WORKFLOW))
def test_the_workflow_is_on_the_readme_s_first_screen(step):
    first = [line.strip() for line in README.read_text().splitlines()[:FIRST_SCREEN]]
    assert any(re.match(WORKFLOW[step], line) for line in first), \
        f"README.md's first {FIRST_SCREEN} lines show no command to {step} ({WORKFLOW[step]})"


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config.get("docs_dir", "docs") == "docs"
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"a page is twice in the nav: {nav}"
    assert set(nav) == {p.name for p in PAGES}, (
        f"in docs/ but not in mkdocs.yml's nav: {sorted({p.name for p in PAGES} - set(nav))}; "
        f"in the nav but not in docs/: {sorted(set(nav) - {p.name for p in PAGES})}")


def _slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*$", text, flags=re.M)}


def test_the_readme_s_links_resolve():
    """mkdocs --strict checks the links between pages of docs/; the README is not part of the site."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) >= 10, local
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README.md links to {link}: no such file"
        if anchor:
            assert anchor in _anchors(target), f"README.md links to {link}: {path} has no heading '#{anchor}'"


def test_the_configuration_page_lists_every_option_of_every_group():
    """docs/configuration.md's group table: the options of each group are the shipped YAML files, and
    the model row states the default network."""
    from medgen.core.paths import configs_dir
    from medgen.diffusion.config import load_config

    page = (DOCS / "configuration.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", page, flags=re.M))
    for group in ("model", "strategy", "mode", "training", "paths"):
        listed = {re.match(r"`(\w+)`", item).group(1) for item in rows[group].split(" · ")}
        assert listed == {p.stem for p in (configs_dir() / group).glob("*.yaml")}, (group, listed)
    model = load_config([]).model
    assert f"image_size {model.image_size}, channels {list(model.channels)}" in rows["model"], rows["model"]


# ============================================================================ every command is real
HYDRA = {"medgen-train": "train", "medgen-lr-find": "lr_find", "medgen-generate": "generate",
         "medgen-evaluate": "evaluate", "medgen.scripts.train": "train", "medgen.scripts.generate": "generate",
         "medgen.scripts.evaluate": "evaluate", "medgen.scripts.lr_find": "lr_find",
         "IDUN/train_template.slurm": "train", "IDUN/generate_template.slurm": "generate"}
ARGPARSE = {"medgen-data": "medgen.scripts.data", "medgen-augment": "medgen.scripts.augment",
            "medgen-demo": "medgen.scripts.demo", "medgen-score": "medgen.scripts.score"}
#: what the SLURM training template passes before the job's own arguments
TEMPLATE_OVERRIDES = {"IDUN/train_template.slurm": ["paths=cluster", "training.use_multi_gpu=true",
                                                    "training.resume=auto"]}
STARTS = tuple(HYDRA) + tuple(ARGPARSE) + ("make", "python", "bash", "torchrun", "sbatch")


def _command_lines(page: Path) -> list[tuple[str, str, bool]]:
    """(where, command line, from a code block) for every command in the page's code blocks (one per
    line, continuation lines joined) and inline code spans."""
    text = page.read_text()
    found = []
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if block.group(1) not in ("", "bash", "sh"):
            continue
        first_line = text[:block.start()].count("\n") + 2
        joined, start = "", None
        for n, line in enumerate(block.group(2).splitlines(), first_line):
            start = start or n
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            joined += line
            found.append((f"{page.name}:{start}", joined.strip(), True))
            joined, start = "", None
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        found.append((f"{page.name}: `{span[:40]}`", span, False))
    return [(where, line, block) for where, line, block in found if line.startswith(STARTS + ("...",))]


def _commands(where: str, line: str, block: bool) -> list[tuple[str, list[str], bool]]:
    """The medgen commands of one line: (what, arguments, complete); ``...`` (the command above) is
    dropped and marks the command incomplete; ``<placeholders>`` become a plain word."""
    line = re.sub(r"<[^<>]*>", "PLACEHOLDER", line)
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as exc:
        raise AssertionError(f"{where}: {line!r} is not a shell command line: {exc}") from None
    commands, current = [], []
    for token in tokens + ["&&"]:
        if token in ("&&", "||", ";", "|", ">", ">>"):
            if current:
                commands.append(current)
            current = [] if token in ("&&", "||", ";") else None
            if current is None:  # a redirection or pipe: the rest is not medgen's
                break
        elif current is not None:
            current.append(token)
    out = []
    for words in commands:
        complete = block and "..." not in words
        words = [w for w in words if w != "..."]
        out += _one(words, complete)
    return out


def _one(words: list[str], complete: bool) -> list[tuple[str, list[str], bool]]:
    if not words:
        return []
    head = words[0]
    if head in HYDRA or head in ARGPARSE:
        return [(head, words[1:], complete)]
    if head in ("python", "torchrun") and "-m" in words:
        module = words[words.index("-m") + 1]
        return [(module, words[words.index("-m") + 2:], complete)] if module in HYDRA else []
    if head in ("python", "bash") and len(words) > 1 and words[1].startswith("benchmarks/"):
        return [("script", words[1:2], complete)]
    if head == "sbatch":
        template = next((w for w in words if w.startswith("IDUN/")), None)
        if template is None:  # `sbatch` named in prose
            return []
        assert template in HYDRA, f"sbatch of an unknown template: {words}"
        return [(template, TEMPLATE_OVERRIDES.get(template, []) + words[words.index(template) + 1:], complete)]
    if head == "make":
        return [("make", words[1:], complete)]
    return []


def _all_commands() -> list[tuple[str, str, str, list[str], bool]]:
    """Every command of README.md and docs/*.md, each distinct one once (where it first appears)."""
    seen, out = set(), []
    for page in TEXTS:
        for where, line, block in _command_lines(page):
            for what, args, complete in _commands(where, line, block):
                if (what, tuple(args), complete) not in seen:
                    seen.add((what, tuple(args), complete))
                    out.append((where, line, what, args, complete))
    return out


COMMANDS = _all_commands()


def test_the_docs_show_commands_of_every_kind():
    kinds = {what for _, _, what, _, _ in COMMANDS}
    assert {"medgen-train", "medgen-lr-find", "medgen-generate", "medgen-evaluate", "medgen-data", "medgen-augment",
            "medgen-demo", "medgen-score", "make", "script"} <= kinds, kinds
    assert len(COMMANDS) >= 60, len(COMMANDS)


GROUPS = ("model", "strategy", "mode", "training", "paths")


def _overrides(args: list[str]) -> list[str]:
    """The Hydra overrides of a command line: ``--cfg job`` and ``hydra.*`` are Hydra's own."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--cfg", "-c"):
            skip = True
        elif arg.startswith("hydra.") or arg.split("=", 1)[0] in GROUPS and arg.endswith("=PLACEHOLDER"):
            continue  # Hydra's own settings; a group named as a placeholder (strategy=<name>)
        else:
            assert "=" in arg, f"not an override: {arg!r}"
            out.append(arg)
    return out


def _given(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def _check_hydra(kind: str, overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from medgen.core.schema import compose_config

    given = _given(overrides)
    if kind == "train":
        from medgen.diffusion.config import unused_keys, validate_config

        cfg = validate_config(compose_config(overrides))
        assert unused_keys(cfg, given) == []
    elif kind == "lr_find":
        from medgen.diffusion.config import unused_keys, validate_config
        from medgen.scripts.lr_find import _check_sweep

        cfg = compose_config(overrides, config_name="lr_find")
        _check_sweep(cfg.lr_find)
        train = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "lr_find"]))
        assert unused_keys(train, given, sweep=True) == []
    elif kind == "generate":
        from medgen.generation.config import ignored_keys, validate_generate_config

        required = [] if "image_checkpoint" in given else ["image_checkpoint=PLACEHOLDER"]
        if "seg_checkpoint" not in given and "masks_from" not in given:
            required.append("seg_checkpoint=PLACEHOLDER")
        cfg = validate_generate_config(compose_config(required + overrides, config_name="generate"))
        assert ignored_keys(cfg) == []
    elif kind == "evaluate":
        from medgen.evaluation.config import unused_keys, validate_evaluate_config

        required = [f"{k}=PLACEHOLDER" for k in ("real_dir", "synthetic_dir") if k not in given]
        cfg = validate_evaluate_config(compose_config(required + overrides, config_name="evaluate"))
        assert unused_keys(cfg, given) == []


def _parser(command: str):
    import importlib

    return importlib.import_module(ARGPARSE[command]).build_parser()


def _check_flags(command: str, args: list[str], complete: bool) -> None:
    import argparse

    parser = _parser(command)
    if complete:
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"{command} {' '.join(args)}: refused by its parser (exit {exc.code})") from None
        return
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers and args and args[0] in subparsers[0].choices:
        parser = subparsers[0].choices[args[0]]
    known = {s for a in parser._actions for s in a.option_strings}
    for arg in args:
        if arg.startswith("-"):
            assert arg.split("=", 1)[0] in known, f"{command}: no flag {arg} (it has {sorted(known)})"


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("where, line, what, args, complete", COMMANDS, ids=[f"{c[0]} {c[2]}" for c in COMMANDS])
def test_every_command_of_the_docs_is_real(where, line, what, args, complete):
    try:
        if what in HYDRA:
            _check_hydra(HYDRA[what], _overrides(args))
        elif what in ARGPARSE:
            _check_flags(what, args, complete)
        elif what == "make":
            assert set(args) <= _makefile_targets(), f"no such make target: {set(args) - _makefile_targets()}"
        elif what == "script":
            assert (ROOT / args[0]).is_file(), f"no such script: {args[0]}"
    except AssertionError as exc:
        raise AssertionError(f"{where}: {line}\n{exc}") from None
    except Exception as exc:  # a config error names the key
        raise AssertionError(f"{where}: {line}\n{type(exc).__name__}: {exc}") from None
