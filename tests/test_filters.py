"""The per-document filters of kilnlm.filters on worked examples: what each one redacts, strips or
drops, and the look-alikes in code that it must leave alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kilnlm.data import CorpusConfig, clean
from kilnlm.documents import Document
from kilnlm.filters import (
    SAFETY_WORDS,
    FilterStats,
    PiiCounts,
    clean_text,
    find_ip_addresses,
    looks_random,
    redact_pii,
    strip_license_header,
    unsafe_ratio,
)


def code(seed: int, n: int = 20) -> str:
    """Plain code that no filter touches (5 words a function); seeds share no shingles."""
    return "\n".join(f"def f{seed}_{i}(x):\n    return x * {seed} + {i}\n" for i in range(n))


FILLER = code(0)
CFG = CorpusConfig(min_chars=100)


# ---- PII: e-mail addresses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("# Author: Barry Warsaw <barry@python.org>", "# Author: Barry Warsaw <<EMAIL>>"),
        ("mail mike.verdone@gmail.com, or", "mail <EMAIL>, or"),
        ("x_y+tag@mail.cs.uni-sb.de.", "<EMAIL>."),
        ('"kbk@shore.net"', '"<EMAIL>"'),
    ],
)
def test_email_addresses_become_placeholders(text: str, want: str) -> None:
    assert redact_pii(text) == (want, PiiCounts(emails=1))


@pytest.mark.parametrize(
    "text",
    [
        "send to user@example.com or admin@mail.example.org",  # RFC 2606: documentation names
        "@property\ndef name(self):",  # decorators
        "@functools.lru_cache(maxsize=None)",
        "y = x@self.weight.T",  # matrix product of attributes: .weight is no top-level domain
        "z = a@b.shape",
        "cls.__init__@wrapper.org",  # a dunder is not a mailbox
        "foo@bar",  # no domain
        "git log --author=foo@localhost",
    ],
)
def test_code_that_looks_like_an_address_is_kept(text: str) -> None:
    assert redact_pii(text) == (text, PiiCounts())


# ---- PII: IP addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("connect to 123.45.67.89 now", "connect to <IP_ADDRESS> now"),
        ("host = '93.184.216.34'", "host = '<IP_ADDRESS>'"),
        ("nameserver 1.2.3.4", "nameserver <IP_ADDRESS>"),  # one-digit parts, but a server
        ("[2607:f8b0:4005:80a::200e]:443", "[<IP_ADDRESS>]:443"),
    ],
)
def test_public_ip_addresses_become_placeholders(text: str, want: str) -> None:
    assert redact_pii(text) == (want, PiiCounts(ip_addresses=1))


@pytest.mark.parametrize(
    "text",
    [
        "192.168.1.1 10.0.0.1 172.16.0.5 127.0.0.1",  # private and loopback
        "192.0.2.1 and 2001:db8::1",  # documentation ranges
        "dns: 8.8.8.8, 1.1.1.1",  # public resolvers everyone names
        "224.0.0.1 ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff0",  # multicast, netmask
        "requires package 1.2.3.4",  # four one-digit parts: a version
        "see sections 8.2.4.44 and 12.2.5.45 of the spec",  # section numbers
        "version 1.2.3.4.5, v2.7.18.1, 1.0.0.127.in-addr.arpa",  # inside longer dotted names
        "999.1.1.1 and 01.02.03.04",  # not addresses at all
        "x[1::2], 12:30:45, std::vector, a::b::c",  # slices, clocks, C++ scopes
    ],
)
def test_numbers_that_look_like_addresses_are_kept(text: str) -> None:
    assert find_ip_addresses(text) == []
    assert redact_pii(text) == (text, PiiCounts())


# ---- PII: keys and secrets -------------------------------------------------------------------

PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2m\n-----END RSA PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE\n", "aws_access_key_id = <KEY>\n"),
        ("GH = 'ghp_" + "a1B2" * 9 + "'", "GH = '<KEY>'"),
        (f"key = '''{PRIVATE_KEY}'''", "key = '''<KEY>'''"),
        ('API_KEY = "9f86d081884c7d659a2feaa0c55ad015"', 'API_KEY = "<KEY>"'),
        ('{"client_secret": "q8Zt3Lw0Xn5Rk2Vb7Jm4"}', '{"client_secret": "<KEY>"}'),
        ("db_password: 'Xk9#mP2$vL5@qR8!'", "db_password: '<KEY>'"),
    ],
)
def test_keys_and_secrets_become_placeholders(text: str, want: str) -> None:
    assert redact_pii(text) == (want, PiiCounts(keys=1))


@pytest.mark.parametrize(
    "text",
    [
        'token = "abcdefghijklmnopqrstuvwx"',  # a word-like value, no digits
        'password = "${DB_PASSWORD_FROM_ENV_2}"',  # a template
        'SECRET_KEY = "<your-secret-key-here-12>"',
        'token_sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"',
        'digest = "9f86d081884c7d659a2feaa0c55ad015"',  # random, but not a secret's name
        'password = "short1x2"',  # under 16 characters
        "if token == 'AbC1dEf2GhI3jKl4MnO5':",  # a comparison, not an assignment
    ],
)
def test_values_that_are_no_secret_are_kept(text: str) -> None:
    assert redact_pii(text) == (text, PiiCounts())


def test_looks_random_separates_machine_values_from_words() -> None:
    assert looks_random("q8Zt3Lw0Xn5Rk2Vb7Jm4")
    assert not looks_random("my_secret_password_value")  # no digits
    assert not looks_random("aaaaaaaaaaaaaaaa1111")  # low entropy


def test_redaction_counts_each_kind_and_keeps_the_rest() -> None:
    text = (
        "# Contact: ann@corp.io or bob@corp.io\n"
        "SERVER = '93.184.216.34'  # staging: 10.1.2.3\n"
        "AWS = 'AKIAIOSFODNN7EXAMPLE'\n"
    )
    out, counts = redact_pii(text)
    assert out == (
        "# Contact: <EMAIL> or <EMAIL>\nSERVER = '<IP_ADDRESS>'  # staging: 10.1.2.3\nAWS = '<KEY>'\n"
    )
    assert counts == PiiCounts(emails=2, ip_addresses=1, keys=1)


# ---- boilerplate -----------------------------------------------------------------------------

MIT_HEADER = (
    "# Copyright (c) 2019 Jane Doe\n"
    "#\n"
    "# Permission is hereby granted, free of charge, to any person obtaining a copy\n"
    "# of this software, to deal in the Software without restriction.\n"
    "\n"
)


def test_a_licence_header_is_removed_with_the_blank_lines_after_it() -> None:
    body = '"""The module."""\nimport os\n'
    assert strip_license_header(MIT_HEADER + body) == (body, len(MIT_HEADER))


def test_shebang_and_coding_lines_stay() -> None:
    prelude = "#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\n"
    text = prelude + MIT_HEADER + "import os\n"
    assert strip_license_header(text) == (prelude + "import os\n", len(MIT_HEADER))


def test_only_the_licence_paragraphs_of_a_header_go() -> None:
    text = (
        "#\n"
        "# Secret Labs' Regular Expression Engine\n"
        "#\n"
        "# Copyright (c) 1998-2001 by Secret Labs AB.  All rights reserved.\n"
        "#\n"
        "# Portions of this engine were developed in cooperation with CNRI.\n"
        "\n"
        "import sre\n"
    )
    want = (
        "#\n"
        "# Secret Labs' Regular Expression Engine\n"
        "#\n"
        "# Portions of this engine were developed in cooperation with CNRI.\n"
        "\n"
        "import sre\n"
    )
    assert strip_license_header(text) == (want, len(text) - len(want))


def test_a_c_style_licence_block_is_removed() -> None:
    text = "/*\n * SPDX-License-Identifier: Apache-2.0\n * Copyright 2020 X\n */\n\nint x;\n"
    assert strip_license_header(text) == ("int x;\n", len(text) - len("int x;\n"))


@pytest.mark.parametrize(
    "text",
    [
        "# A helper for parsing dates.\n#\n# See parse() below.\nimport re\n",  # no licence words
        "import re\n# Copyright (c) 2019 Jane Doe\n",  # not at the top
        '"""Docstring."""\n# Licensed under the MIT License\n',
        "\n# Copyright 2001 X\nimport re\n",  # the file starts with code (a blank line)
    ],
)
def test_other_comments_are_left_alone(text: str) -> None:
    assert strip_license_header(text) == (text, 0)


# ---- safety ----------------------------------------------------------------------------------


def test_unsafe_ratio_counts_listed_words_only() -> None:
    assert unsafe_ratio("Essex cockpit Scunthorpe XXX: fix this") == 0.0  # no substring matches
    assert unsafe_ratio("free porn here now") == 0.25
    assert unsafe_ratio("FREE PORN, here now!") == 0.25  # case-folded, punctuation ignored
    assert "porn" in SAFETY_WORDS


def test_safety_threshold_is_tunable(tmp_path: Path) -> None:
    doc = code(1, 40) + "\n# one fucking comment\n"  # 1 listed word in 203
    assert clean_text(doc, CFG).reason is None  # the default 0.01 lets a stray word pass
    assert clean_text(doc, replace(CFG, safety_threshold=0.0)).reason == "unsafe"  # C4's rule
    spam = FILLER + "\n# porn porn porn porn porn\n"
    assert clean_text(spam, CFG).reason == "unsafe"
    assert clean_text(spam, replace(CFG, safety_threshold=1.0)).reason is None  # off
    words = tmp_path / "words.txt"
    words.write_text("# our list\nreturn\n", encoding="utf-8")
    mine = replace(CFG, safety_words_file=str(words))
    assert clean_text(spam, mine).reason == "unsafe"  # 'return' is 20 of ~100 words
    assert clean_text(spam, replace(mine, safety_threshold=0.5)).reason is None


# ---- one document through all of them, and the counts ---------------------------------------


def test_clean_text_strips_then_filters_then_redacts() -> None:
    doc = MIT_HEADER + "# Maintainer: ann@corp.io\n" + FILLER
    out = clean_text(doc, CFG)
    assert out.reason is None
    assert out.text == "# Maintainer: <EMAIL>\n" + FILLER
    assert out.boilerplate_bytes == len(MIT_HEADER.encode())
    assert out.pii == PiiCounts(emails=1)


def test_a_licence_only_file_is_too_short_and_a_generated_one_is_generated() -> None:
    assert len(MIT_HEADER) > CFG.min_chars
    assert clean_text(MIT_HEADER, CFG).reason == "too_short"
    generated = "# Copyright 2020 X\n# Auto-generated by make_tables.py. Do not edit.\n" + FILLER
    assert clean_text(generated, CFG).reason == "generated"  # the marker sat in the header
    off = replace(CFG, strip_boilerplate=False, redact_pii=False)
    assert clean_text(MIT_HEADER + FILLER, off).text == MIT_HEADER + FILLER


def test_filter_stats_count_each_filter() -> None:
    docs = [
        Document(MIT_HEADER + FILLER, "licensed"),
        Document("# by ann@corp.io from 93.184.216.34\n" + code(1), "pii"),
        Document(code(2) + "# porn porn porn porn porn porn\n", "unsafe"),
        Document(FILLER, "duplicate of the licensed one once its header is gone"),
    ]
    kept, stats = clean(docs, CFG)
    assert [d.source for d in kept] == ["licensed", "pii"]
    assert stats == FilterStats(
        n_input=4,
        bytes_input=sum(len(d.text.encode()) for d in docs),
        unsafe=1,
        exact_duplicates=1,
        boilerplate_headers=1,
        boilerplate_bytes=len(MIT_HEADER),
        pii_emails=1,
        pii_ip_addresses=1,
        n_kept=2,
        bytes_kept=sum(len(d.text.encode()) for d in kept),
    )
    assert "<EMAIL>" in kept[1].text and "<IP_ADDRESS>" in kept[1].text


def test_safety_threshold_is_validated() -> None:
    with pytest.raises(ValueError, match=r"CorpusConfig\.safety_threshold "):
        CorpusConfig(safety_threshold=1.5)
