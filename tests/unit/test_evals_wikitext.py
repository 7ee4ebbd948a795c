"""WikiText-2 under lm-evaluation-harness's definition (``--style harness``): pages, detokenizer, rolling
windows from EOT with no context across pages, word/byte counts of the original pages."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from gpt2repro.config import EOT_TOKEN_ID, GPTConfig
from gpt2repro.evals.perplexity import document_perplexity, read_text
from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.evals.wikitext import harness_perplexity, rolling_windows, split_pages, wikitext_detokenizer
from gpt2repro.model import GPT
from gpt2repro.tokenizer import get_tokenizer

WIKI_TEST = "wikitext-2-raw/wiki.test.raw"


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("gpt2-micro", block_size=64)).eval()


@pytest.fixture()
def three_pages(shared_data) -> str:
    """The first 3 articles of WikiText-2 test, 400 characters each (headings, `@-@` artefacts kept)."""
    pages = split_pages(read_text(shared_data / WIKI_TEST))
    return "\n".join(page[:400] for page in pages[:3])


def test_page_splitter_yields_the_62_articles_of_wikitext2_test(shared_data):
    text = read_text(shared_data / WIKI_TEST)
    pages = split_pages(text)
    assert len(pages) == 62
    assert pages[0].startswith(" = Robert Boulter = \n")
    assert pages[1].startswith(" = Du Fu = \n") and pages[-1].startswith(" = The Hustler ( film ) = \n")
    assert text == " \n" + "\n".join(pages)  # lossless but for the blank line before the first heading
    # section headings (" = = Career = = ") stay inside their article
    assert sum(page.count("\n = = ") for page in pages) > 100
    assert all(re.fullmatch(r" = [^=].*[^=] = ", page.split("\n")[0]) for page in pages)  # title lines


def test_page_splitter_rules():
    text = " \n = A = \n a . \n = = Sub = = \n b \n \n = B = \n c \n"
    assert split_pages(text) == [" = A = \n a . \n = = Sub = = \n b \n ", " = B = \n c \n"]
    assert split_pages("no heading at all") == ["no heading at all"]
    assert split_pages(" = A = \n x\n = B = ") == [" = A = \n x", " = B = "]  # the last page is kept


@pytest.mark.parametrize(
    "raw,expected",
    [
        (
            " The 2 @,@ 500 @-@ year @-@ old hall , built in 1 @.@ 5 years . \n",
            " The 2,500-year-old hall, built in 1.5 years.\n",
        ),
        (" = = Career = = \n", " == Career ==\n"),
        (" = = = 2004 – 08 = = = \n", " === 2004 – 08 ===\n"),
        ('He said " hello there " ( in French ) .', 'He said "hello there" (in French) .'),
        ("the players ' union", "the players' union"),
        ("John 's car", "John's car"),
        ("a N year ; then : 30 ° C !", "a 1 year; then: 30°C !"),
        ("line one \n line two", "line one\nline two"),
        ("[ 1 ] { x }", "[1] {x}"),
    ],
)
def test_detokenizer_on_known_lines(raw, expected):
    assert wikitext_detokenizer(raw) == expected


def test_detokenizer_on_the_first_article(shared_data):
    page = split_pages(read_text(shared_data / WIKI_TEST))[0]
    assert wikitext_detokenizer(page[: page.index(" This was")]) == (
        " = Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor. He had a "
        "guest-starring role on the television series The Bill in 2000 ."
    )


def test_rolling_windows_by_hand():
    tokens = list(range(100, 110))
    assert rolling_windows(tokens, 4) == [
        ([EOT_TOKEN_ID], [100, 101, 102, 103]),  # from EOT
        ([103], [104, 105, 106, 107]),  # the one token before
        ([105, 106, 107], [108, 109]),  # the last, shorter window: as much history as fits
    ]
    assert rolling_windows(tokens[:3], 4) == [([EOT_TOKEN_ID], [100, 101, 102])]
    assert rolling_windows([], 4) == []
    for n, context in [(1, 1), (7, 1), (64, 64), (65, 64), (200, 16)]:
        windows = rolling_windows(list(range(n)), context)
        assert [t for _, scored in windows for t in scored] == list(range(n))  # every token once
        assert all(len(h) + len(s) - 1 <= context for h, s in windows)  # fed tokens fit the context


@torch.inference_mode()
def reference_nll(model: GPT, pages: list[str], context: int) -> tuple[float, int]:
    """lm-eval's rolling loglikelihood by its definition, one window and full logits at a time.

    Per page, seq = [EOT] + tokens(detokenized page); a window scores tokens[start:end] (consecutive
    blocks of ``context``) and is fed the ``context`` positions of seq that end just before its last target.
    """
    enc = get_tokenizer()
    nll, count = 0.0, 0
    for page in pages:
        tokens = enc.encode_ordinary(wikitext_detokenizer(page))
        seq = torch.tensor([EOT_TOKEN_ID, *tokens])
        for start in range(0, len(tokens), context):
            end = min(start + context, len(tokens))
            logits, _ = model(seq[None, max(0, end - context) : end])
            scored = logits[0, -(end - start) :]
            nll += F.cross_entropy(scored, seq[start + 1 : end + 1], reduction="sum").item()
            count += end - start
    return nll, count


@pytest.mark.parametrize("context,batch_size", [(16, 3), (64, 1)])
def test_harness_style_equals_rolling_window_reference(model, three_pages, context, batch_size):
    pages = split_pages(three_pages)
    assert len(pages) == 3
    res = harness_perplexity(model, three_pages, EvalSetup(batch_size=batch_size), context=context)
    nll, count = reference_nll(model, pages, context)
    words = sum(len(re.split(r"\s+", page)) for page in pages)  # of the original pages
    n_bytes = sum(len(page.encode("utf-8")) for page in pages)
    assert res["pages"] == 3 and res["n"] == count and res["words"] == words and res["bytes"] == n_bytes
    assert res["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert res["word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert res["byte_ppl"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert res["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    # the reference can tell: one document (context across pages) scores differently
    joined_nll, _ = reference_nll(model, ["\n".join(pages)], context)
    assert abs(joined_nll - nll) > 1e-3 * nll
    assert res["style"] == "harness" and res["stride"] == context and res["context"] == context
    assert "wikitext_detokenizer" in res["detokenizer"] and "pages" in res["document_split"]


def test_limit_counts_pages_and_styles_differ(model, three_pages):
    first = harness_perplexity(model, three_pages, limit=1, context=32)
    assert first["pages"] == 1
    assert first["n"] == len(
        get_tokenizer().encode_ordinary(wikitext_detokenizer(split_pages(three_pages)[0]))
    )
    paper = document_perplexity(model, three_pages, context=32)
    harness = harness_perplexity(model, three_pages, context=32)
    assert paper["style"] == "paper" and paper["detokenizer"] == "none"
    assert paper["word_ppl"] != pytest.approx(harness["word_ppl"], rel=1e-3)
