"""FASTA reader: validation rules, file-level errors, sources (path, gzip, stdin, streams) and streaming."""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protsae_cli.errors import InputError
from protsae_cli.io.fasta import ESM_ALPHABET, InvalidRecord, ProteinRecord, open_text, read_fasta


def write(tmp_path: Path, text: str | bytes, name: str = "in.fasta") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def records(source, **kwargs) -> list:
    return list(read_fasta(source, **kwargs))


def error_of(source, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        records(source, **kwargs)
    return str(info.value)


# --- residue rules -----------------------------------------------------------------------------------------


def test_lowercase_is_uppercased_and_one_trailing_stop_dropped(tmp_path):
    path = write(tmp_path, ">p1\nmkvL\nacd*\n")
    assert records(path) == [ProteinRecord(0, "p1", "", "MKVLACD")]


def test_full_esm_alphabet_including_ambiguous_and_rare_residues_is_accepted(tmp_path):
    path = write(tmp_path, f">all\n{ESM_ALPHABET}\n>lower\n{ESM_ALPHABET.lower()}\n")
    assert [r.sequence for r in records(path)] == [ESM_ALPHABET, ESM_ALPHABET]


def test_only_one_trailing_stop_is_dropped(tmp_path):
    path = write(tmp_path, ">p1\nMKV**\n")
    assert error_of(path).endswith("protein 'p1' (record 1): invalid character '*' at position 4")


def test_stop_in_the_middle_is_an_error(tmp_path):
    path = write(tmp_path, ">p1\nMK*V\n")
    assert "protein 'p1' (record 1): invalid character '*' at position 3" in error_of(path)


def test_stop_at_a_line_end_inside_the_sequence_is_an_error(tmp_path):
    path = write(tmp_path, ">p1\nMK*\nVL\n")
    assert "invalid character '*' at position 3" in error_of(path)


def test_gap_reports_id_record_and_one_based_position_across_wrapped_lines(tmp_path):
    # position 17 is on the second sequence line (10 residues per line), column 7
    path = write(tmp_path, ">ok\nMKV\n>sp|P12345|X desc\nACDEFGHIKL\nMNPQRS-TVW\n")
    message = error_of(path)
    assert "protein 'sp|P12345|X' (record 2): invalid character '-' at position 17" in message
    assert message.startswith(f"{path}, line 5, column 7:")


@pytest.mark.parametrize("char", [".", "1", "J", "#", "é"])
def test_other_characters_are_errors(tmp_path, char):
    path = write(tmp_path, f">p\nAC{char}D\n")
    assert f"invalid character {char!r} at position 3" in error_of(path)


@pytest.mark.parametrize(("line", "position"), [("AC DE", 3), ("AC\tDE", 3), (" ACDE", 1), ("AC\u00a0DE", 3)])
def test_whitespace_inside_a_sequence_line_is_an_error(tmp_path, line, position):
    path = write(tmp_path, f">p\n{line}\n")
    assert f"whitespace inside a sequence line at position {position}" in error_of(path)


def test_trailing_whitespace_and_blank_lines_are_only_formatting(tmp_path):
    path = write(tmp_path, "\n\n>p1  \nMKV  \n\n  \nLL\t\n\n>p2\nAA\n\n")
    assert records(path) == [ProteinRecord(0, "p1", "", "MKVLL"), ProteinRecord(1, "p2", "", "AA")]


@pytest.mark.parametrize("body", ["", "*\n", "\n\n"])
def test_empty_sequence_is_an_error(tmp_path, body):
    path = write(tmp_path, f">p1\nMK\n>empty desc\n{body}>p3\nAA\n")
    assert "protein 'empty' (record 2): empty sequence" in error_of(path)


def test_empty_sequence_as_last_record_is_an_error(tmp_path):
    path = write(tmp_path, ">p1\nMK\n>last\n")
    assert "protein 'last' (record 2): empty sequence" in error_of(path)


@pytest.mark.parametrize("header", [">", ">   "])
def test_header_without_id_is_an_error_for_that_record(tmp_path, header):
    path = write(tmp_path, f">p1\nMK\n{header}\nAAA\n>p3\nLL\n")
    message = error_of(path)
    assert "(record 2): header has no id" in message
    assert ", line 3:" in message
    got = records(path, skip_invalid=True)
    assert isinstance(got[1], InvalidRecord) and got[1].index == 1 and got[1].id == ""
    assert got[2] == ProteinRecord(2, "p3", "", "LL")


# --- headers -----------------------------------------------------------------------------------------------


def test_id_and_description_are_kept_verbatim(tmp_path):
    path = write(tmp_path, ">sp|P69905|HBA_HUMAN Hemoglobin  subunit alpha OS=Homo sapiens\nMVL\n")
    (rec,) = records(path)
    assert rec.id == "sp|P69905|HBA_HUMAN"
    assert rec.description == "Hemoglobin  subunit alpha OS=Homo sapiens"


def test_ids_with_slashes_and_non_ascii_are_verbatim(tmp_path):
    path = write(tmp_path, ">UniRef50_Q/12-40 x\nMK\n>prot_α/β→γ\nLL\n>../../etc/passwd\nAA\n")
    assert [r.id for r in records(path)] == ["UniRef50_Q/12-40", "prot_α/β→γ", "../../etc/passwd"]


def test_duplicate_ids_are_kept_in_order_with_distinct_indices(tmp_path):
    path = write(tmp_path, ">dup first\nAA\n>dup second\nCC\n>other\nDD\n>dup third\nEE\n")
    got = records(path)
    assert [(r.index, r.id, r.description, r.sequence) for r in got] == [
        (0, "dup", "first", "AA"),
        (1, "dup", "second", "CC"),
        (2, "other", "", "DD"),
        (3, "dup", "third", "EE"),
    ]


def test_crlf_line_endings(tmp_path):
    path = write(tmp_path, b">p1 some desc\r\nMKV\r\nLL*\r\n>p2\r\nAA\r\n")
    assert records(path) == [ProteinRecord(0, "p1", "some desc", "MKVLL"), ProteinRecord(1, "p2", "", "AA")]


def test_crlf_in_a_text_stream_without_newline_translation():
    stream = io.StringIO(">p1 d\r\nMKV\r\n", newline="")
    assert records(stream) == [ProteinRecord(0, "p1", "d", "MKV")]


def test_utf8_byte_order_mark_is_ignored(tmp_path):
    path = write(tmp_path, "\ufeff>p1\nMK\n".encode("utf-8"))
    assert records(path) == [ProteinRecord(0, "p1", "", "MK")]


# --- skip_invalid ------------------------------------------------------------------------------------------


def test_skip_invalid_yields_invalid_records_in_place_and_continues(tmp_path):
    path = write(tmp_path, ">a\nMK\n>b gap\nM-K\n>c\nLL\n>d\nZZ1\n>e\nAA\n")
    got = records(path, skip_invalid=True)
    assert [r.index for r in got] == [0, 1, 2, 3, 4]
    assert [type(r).__name__ for r in got] == [
        "ProteinRecord", "InvalidRecord", "ProteinRecord", "InvalidRecord", "ProteinRecord",
    ]
    assert got[1] == InvalidRecord(1, "b", "gap", "protein 'b' (record 2): invalid character '-' at position 2")
    assert got[3].error == "protein 'd' (record 4): invalid character '1' at position 3"


def test_without_skip_invalid_the_first_bad_record_raises_after_earlier_good_ones(tmp_path):
    path = write(tmp_path, ">a\nMK\n>b\nM-K\n>c\nLL\n")
    stream = read_fasta(path)
    assert next(stream) == ProteinRecord(0, "a", "", "MK")
    with pytest.raises(InputError, match="protein 'b' \\(record 2\\)"):
        next(stream)


def test_skip_invalid_does_not_hide_file_level_errors(tmp_path):
    path = write(tmp_path, "not fasta\n>a\nMK\n")
    with pytest.raises(InputError, match="line 1"):
        records(path, skip_invalid=True)


# --- file-level errors -------------------------------------------------------------------------------------


def test_text_before_first_header_names_file_and_line(tmp_path):
    path = write(tmp_path, "\n# exported by tool\n>p1\nMK\n")
    message = error_of(path)
    assert message.startswith(f"{path}, line 2:")
    assert "'>'" in message and "FASTA" in message


def test_sequence_without_any_header_is_not_fasta(tmp_path):
    path = write(tmp_path, "MKVLAAGG\n")
    assert error_of(path).startswith(f"{path}, line 1: expected a FASTA header")


def test_empty_file(tmp_path):
    path = write(tmp_path, b"")
    assert error_of(path) == f"{path}, line 1: the input is empty; expected a FASTA header starting with '>'"


def test_whitespace_only_file(tmp_path):
    path = write(tmp_path, "\n  \n\n")
    assert error_of(path).startswith(f"{path}, line 3: no FASTA header")


def test_binary_junk_is_not_fasta(tmp_path):
    path = write(tmp_path, bytes(range(256)) * 4, name="weights.bin")
    message = error_of(path)
    assert message.startswith(f"{path}, line 1:") and "does not look like FASTA" in message


def test_nul_bytes_after_a_header_mean_binary(tmp_path):
    path = write(tmp_path, b">p1\nMK\x00\x00V\n")
    assert "line 2: NUL byte at column 3" in error_of(path)


def test_undecodable_bytes_name_file_line_and_byte(tmp_path):
    path = write(tmp_path, ">p1\nMK\n>p2 caf\xe9\nLL\n".encode("latin-1"))
    message = error_of(path)
    assert message.startswith(f"{path}, line 3:")
    assert "0xe9" in message and "UTF-8" in message


def test_missing_file_raises_before_iteration(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_fasta(tmp_path / "absent.fa")


def test_directory_is_rejected(tmp_path):
    with pytest.raises(InputError, match="directory"):
        read_fasta(tmp_path)


def test_other_compression_formats_are_named(tmp_path):
    path = write(tmp_path, b"BZh91AY&SY" + bytes(range(40)), name="in.fa.bz2")
    assert "bzip2-compressed" in error_of(path)


# --- sources -----------------------------------------------------------------------------------------------

TEXT = ">p1 first protein\nmkv*\n>p2\nLL\n"
EXPECTED = [ProteinRecord(0, "p1", "first protein", "MKV"), ProteinRecord(1, "p2", "", "LL")]


def test_gzip_path(tmp_path):
    path = write(tmp_path, gzip.compress(TEXT.encode()), name="in.fasta.gz")
    assert records(path) == EXPECTED


def test_gzip_detected_by_magic_bytes_not_suffix(tmp_path):
    gz_without_suffix = write(tmp_path, gzip.compress(TEXT.encode()), name="in.fasta")
    plain_with_gz_suffix = write(tmp_path, TEXT, name="plain.fa.gz")
    assert records(gz_without_suffix) == EXPECTED
    assert records(plain_with_gz_suffix) == EXPECTED


def test_truncated_gzip_is_an_input_error(tmp_path):
    data = gzip.compress((TEXT * 200).encode())
    path = write(tmp_path, data[: len(data) // 2], name="cut.fa.gz")
    assert "cannot read the input" in error_of(path)


def test_str_path_and_pathlike(tmp_path):
    path = write(tmp_path, TEXT)
    assert records(str(path)) == records(path) == EXPECTED


def test_stdin_text_stream(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT))
    assert records("-") == EXPECTED


def test_stdin_dash_as_path_object(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT))
    assert records(Path("-")) == EXPECTED


def test_stdin_with_a_byte_buffer_is_decoded_as_utf8_and_may_be_gzip(monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(gzip.compress(">p_é\nAC\n".encode())), encoding="ascii")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert records("-") == [ProteinRecord(0, "p_é", "", "AC")]
    assert not stdin.buffer.closed  # we must not close a stream we did not open


def test_stdin_error_messages_name_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(">p\nA-C\n"))
    assert error_of("-").startswith("<stdin>, line 2, column 2:")


def test_open_binary_stream_is_sniffed_and_left_open():
    raw = io.BytesIO(gzip.compress(TEXT.encode()))
    assert records(raw) == EXPECTED
    assert not raw.closed


def test_open_text_yields_readable_text_for_each_source_kind(tmp_path, monkeypatch):
    plain = write(tmp_path, TEXT, name="a.fa")
    packed = write(tmp_path, gzip.compress(TEXT.encode()), name="a.fa.gz")
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT))
    for source in (plain, str(packed), "-", io.StringIO(TEXT), io.BytesIO(TEXT.encode())):
        with open_text(source) as stream:
            assert stream.read() == TEXT


def test_open_text_missing_file():
    with pytest.raises(InputError, match="cannot open"):
        with open_text("/nonexistent/dir/x.fa"):
            pass


# --- streaming ---------------------------------------------------------------------------------------------


class CountingLines(io.TextIOBase):
    """A text stream that generates a huge FASTA lazily and counts how many lines were pulled."""

    def __init__(self, n_records: int) -> None:
        self.pulled = 0
        self._lines = self._generate(n_records)

    @staticmethod
    def _generate(n: int):
        for i in range(n):
            yield f">prot{i} description {i}\n"
            yield "ACDEFGHIKLMNPQRSTVWY" * 3 + "\n"
            yield "MKV\n"

    def readable(self) -> bool:
        return True

    def readline(self, size: int = -1) -> str:
        line = next(self._lines, "")
        self.pulled += bool(line)
        return line

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def read(self, size: int = -1) -> str:  # pragma: no cover - reading everything would defeat the test
        raise AssertionError("read_fasta must not read the whole input")


def test_reading_is_lazy_and_record_by_record():
    stream = CountingLines(n_records=1_000_000)
    it = read_fasta(stream)
    assert stream.pulled == 0  # nothing is read before iteration starts
    first = next(it)
    assert first == ProteinRecord(0, "prot0", "description 0", "ACDEFGHIKLMNPQRSTVWY" * 3 + "MKV")
    assert stream.pulled <= 4  # the record's lines plus the next header, which ends it
    for _ in range(9):
        next(it)
    assert stream.pulled <= 31


@pytest.mark.parametrize("packed", [False, True])
def test_large_file_first_record_reads_only_the_start(tmp_path, packed):
    data = "".join(f">p{i}\n{'ACDEFGHIKL' * 10}\n" for i in range(50_000)).encode()  # ~5.5 MB
    path = write(tmp_path, gzip.compress(data) if packed else data, name="big.fa")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        it = read_fasta(handle)
        assert next(it).id == "p0"
        assert handle.tell() < min(size // 4, 1 << 20)  # a few buffers, not the file
        it.close()  # abandoning the generator early must not close a stream we handed in
        assert not handle.closed
    assert next(read_fasta(path)).id == "p0"


# --- round trip --------------------------------------------------------------------------------------------

_TEXT_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00\r\n\ufeff")
ids = st.text(_TEXT_CHARS, min_size=1, max_size=20).filter(lambda s: not any(c.isspace() for c in s))
descriptions = st.text(_TEXT_CHARS, max_size=30).map(str.strip)
sequences = st.tuples(
    st.text(st.sampled_from(ESM_ALPHABET + ESM_ALPHABET.lower()), min_size=1, max_size=300), st.booleans()
)
protein_lists = st.lists(st.tuples(ids, descriptions, sequences, st.integers(1, 80)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proteins=protein_lists, crlf=st.booleans(), packed=st.booleans(), sep=st.sampled_from([" ", "\t", "  "]))
def test_round_trip_of_random_valid_records(proteins, crlf, packed, sep):
    newline = "\r\n" if crlf else "\n"
    parts = []
    for pid, desc, (seq, stop), width in proteins:
        header = f">{pid}{sep}{desc}" if desc else f">{pid}"
        body = seq + ("*" if stop else "")
        wrapped = [body[i : i + width] for i in range(0, len(body), width)]
        parts.append(newline.join([header, *wrapped]) + newline)
    data = "".join(parts).encode("utf-8")
    if packed:
        data = gzip.compress(data)
    got = records(io.BytesIO(data))
    assert got == [
        ProteinRecord(i, pid, desc, seq.upper()) for i, (pid, desc, (seq, _), _) in enumerate(proteins)
    ]


@settings(max_examples=100, deadline=None)
@given(
    seq=st.text(st.sampled_from(ESM_ALPHABET), min_size=1, max_size=200),
    bad=st.sampled_from("-.0123456789*#J?"),
    data=st.data(),
)
def test_any_bad_character_is_reported_at_its_position(seq, bad, data):
    # a '*' at the very end would be the permitted stop symbol, so keep it inside
    pos = data.draw(st.integers(0, len(seq) - 1 if bad == "*" else len(seq)))
    mutated = seq[:pos] + bad + seq[pos:]
    got = records(io.StringIO(f">x\n{mutated}\n"), skip_invalid=True)
    message = f"protein 'x' (record 1): invalid character {bad!r} at position {pos + 1}"
    assert got == [InvalidRecord(0, "x", "", message)]


def test_records_are_frozen():
    rec = ProteinRecord(0, "a", "", "MK")
    with pytest.raises(Exception):
        rec.sequence = "LL"  # type: ignore[misc]
