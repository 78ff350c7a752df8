#!/usr/bin/env python3
"""Generate worker/unicode_data.c: the tables behind NFC in worker/unicode.c.

Run at development time (the output is committed):
    python3 tools/gen_unicode_data.py [UCD_DIR] > worker/unicode_data.c
UCD_DIR defaults to /usr/share/unicode (Debian's unicode-data package); it
reads UnicodeData.txt, CompositionExclusions.txt and DerivedAge.txt, and,
only to cross-check the quick-check flags it derives,
DerivedNormalizationProps.txt when present.

Tables written:
  * a two-stage lookup giving, per code point, its canonical combining class,
    or 255 for a starter that is not a safe NFC boundary (see QC_NOT_SAFE);
    0 means "starter, NFC-stable, never combines backwards", so runs of such
    characters are copied verbatim;
  * full canonical decompositions (recursively expanded, Hangul excluded,
    since Hangul is algorithmic) as a sorted key array plus a code point pool;
  * primary composites: (first, second) -> composite, sorted, for binary search;
  * the Unicode version that assigned each code point NFC looks up (marks,
    decomposables, composites), as sorted ranges, so NFC can act as an
    implementation with older tables would (tokenizers' NFC does);
  * code points assigned since Unicode 13.0, as ranges of one general category
    and one age: a regex engine whose tables are older than this data treats
    them as unassigned, so the tokenizer adds them to \p{..} classes.
"""
import os
import sys

QC_NOT_SAFE = 255
BLOCK = 128

S_BASE, L_BASE, V_BASE, T_BASE = 0xAC00, 0x1100, 0x1161, 0x11A7
L_COUNT, V_COUNT, T_COUNT = 19, 21, 28
S_COUNT = L_COUNT * V_COUNT * T_COUNT


def read_unicode_data(path, gc):
    ccc, decomp = {}, {}
    with open(path, encoding="utf-8") as f:
        prev = None
        for line in f:
            fields = line.rstrip("\n").split(";")
            cp = int(fields[0], 16)
            name = fields[1]
            # Ranges (<CJK Ideograph, First> ... Last>) carry ccc 0 and no
            # decomposition, so they need no expansion here.
            if name.endswith(", First>"):
                prev = cp
                continue
            if name.endswith(", Last>"):
                for x in range(prev, cp + 1):
                    gc[x] = fields[2]
                prev = None
                continue
            gc[cp] = fields[2]
            c = int(fields[3])
            if c:
                ccc[cp] = c
            d = fields[5]
            if d and not d.startswith("<"):
                decomp[cp] = [int(x, 16) for x in d.split()]
    return ccc, decomp


def read_exclusions(path):
    out = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if ".." in line:
                a, b = line.split("..")
                out.update(range(int(a, 16), int(b, 16) + 1))
            else:
                out.add(int(line, 16))
    return out


def read_ages(path):
    """Code point -> (major, minor) of the Unicode version that assigned it."""
    ages = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            body = line.split("#", 1)[0].strip()
            if not body:
                continue
            r, age = [x.strip() for x in body.split(";")]
            major, minor = (int(x) for x in age.split("."))
            a, b = (r.split("..") + [r])[:2]
            for cp in range(int(a, 16), int(b, 16) + 1):
                ages[cp] = (major, minor)
    return ages


NEW_SINCE = (13, 0)  # older regex tables than Unicode 13.0 are not catered for


def new_ranges(gc, ages):
    """Ranges (start, end, category, age) of code points assigned at or after
    NEW_SINCE, split wherever the category or the age changes."""
    out = []
    for cp in sorted(c for c, a in ages.items() if a >= NEW_SINCE and c in gc):
        key = (gc[cp], ages[cp])
        if out and out[-1][1] == cp - 1 and (out[-1][2], out[-1][3]) == key:
            out[-1][1] = cp
        else:
            out.append([cp, cp, key[0], key[1]])
    return out


def full_decomp(cp, decomp, memo):
    if cp in memo:
        return memo[cp]
    if cp not in decomp:
        memo[cp] = [cp]
        return memo[cp]
    out = []
    for x in decomp[cp]:
        out.extend(full_decomp(x, decomp, memo))
    memo[cp] = out
    return out


def hangul_decomp(cp):
    s = cp - S_BASE
    l = L_BASE + s // (V_COUNT * T_COUNT)
    v = V_BASE + (s % (V_COUNT * T_COUNT)) // T_COUNT
    t = T_BASE + s % T_COUNT
    return [l, v] if t == T_BASE else [l, v, t]


def read_nfc_qc(path):
    """Code points whose NFC_QC is No or Maybe (for the self-check)."""
    out = set()
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            body = line.split("#", 1)[0]
            parts = [p.strip() for p in body.split(";")]
            if len(parts) < 3 or parts[1] != "NFC_QC":
                continue
            r = parts[0]
            if ".." in r:
                a, b = r.split("..")
                out.update(range(int(a, 16), int(b, 16) + 1))
            else:
                out.add(int(r, 16))
    return out


def c_array(ctype, name, values, per_line, fmt):
    lines = ["const %s %s[%d] = {" % (ctype, name, len(values))]
    for i in range(0, len(values), per_line):
        lines.append("    " + ",".join(fmt(v) for v in values[i:i + per_line]) + ",")
    lines.append("};")
    return "\n".join(lines)


def main():
    ucd = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/unicode"
    gc = {}
    ccc, decomp = read_unicode_data(os.path.join(ucd, "UnicodeData.txt"), gc)
    ages = read_ages(os.path.join(ucd, "DerivedAge.txt"))
    fresh = new_ranges(gc, ages)
    ucd_version = max(ages.values())
    excl = read_exclusions(os.path.join(ucd, "CompositionExclusions.txt"))

    memo = {}
    full = {cp: full_decomp(cp, decomp, memo) for cp in decomp}

    # Primary composites: two-element canonical decompositions that are not
    # excluded and whose source is not a non-starter (UAX #15, Full
    # Composition Exclusion = exclusions + singletons + non-starter decomps).
    comp = {}
    for cp, d in decomp.items():
        if len(d) != 2 or cp in excl or ccc.get(cp, 0) != 0 or ccc.get(d[0], 0) != 0:
            continue
        comp[(d[0], d[1])] = cp
    seconds = {b for (_, b) in comp}
    seconds.update(range(V_BASE, V_BASE + V_COUNT))
    seconds.update(range(T_BASE + 1, T_BASE + T_COUNT))

    def nfc_changes(cp):
        # A starter whose NFC differs from itself: singletons, exclusions and
        # non-starter decompositions (they never recompose to themselves).
        if cp not in decomp:
            return False
        d = decomp[cp]
        if len(d) == 1 or cp in excl:
            return True
        return ccc.get(d[0], 0) != 0

    # Per code point value: ccc for non-starters; QC_NOT_SAFE for a starter
    # that can change or combine with what precedes it; 0 otherwise.
    limit = 0
    value = {}
    for cp in set(ccc) | set(decomp) | seconds:
        c = ccc.get(cp, 0)
        if c:
            v = c
        else:
            first = full[cp][0] if cp in full else cp
            unsafe = (nfc_changes(cp) or cp in seconds or ccc.get(first, 0) != 0
                      or first in seconds)
            v = QC_NOT_SAFE if unsafe else 0
        if v:
            value[cp] = v
            limit = max(limit, cp + 1)
    assert max(ccc.values()) < QC_NOT_SAFE

    # Self-check: everything Unicode marks NFC_QC No/Maybe must be non-zero
    # here, so the verbatim fast path never skips work.
    qc = read_nfc_qc(os.path.join(ucd, "DerivedNormalizationProps.txt"))
    if qc is not None:
        missing = [cp for cp in qc if cp not in value]
        if missing:
            sys.exit("gen_unicode_data: NFC_QC No/Maybe but marked safe: %s"
                     % " ".join("%04X" % c for c in missing[:20]))

    nblocks = (limit + BLOCK - 1) // BLOCK
    stage1, stage2, seen = [], [], {}
    for b in range(nblocks):
        blk = tuple(value.get(b * BLOCK + i, 0) for i in range(BLOCK))
        if blk not in seen:
            seen[blk] = len(seen)
            stage2.extend(blk)
        stage1.append(seen[blk])
    assert len(seen) <= 256

    dkeys = sorted(full)
    pool, dpos = [], []
    for cp in dkeys:
        d = full[cp]
        assert 1 <= len(d) <= 4
        off = len(pool)
        assert off < (1 << 14)
        dpos.append((off << 2) | (len(d) - 1))
        pool.extend(d)

    ckeys = sorted(comp)

    # Ages of the code points NFC's slow path asks about, as ranges that may
    # run over code points it never asks about.
    relevant = sorted(set(value) | set(full) | set(comp.values()))
    age_lo, age_ver = [], []
    for cp in relevant:
        a = ages[cp][0] * 100 + ages[cp][1]
        if not age_ver or age_ver[-1] != a:
            age_lo.append(cp)
            age_ver.append(a)

    out = []
    out.append("/* unicode_data.c: generated by tools/gen_unicode_data.py, do not edit.")
    out.append(" * Source: %s/UnicodeData.txt, CompositionExclusions.txt, DerivedAge.txt" % ucd)
    out.append(" * (Unicode %d.%d)." % ucd_version)
    out.append(" * Regenerate: python3 tools/gen_unicode_data.py > worker/unicode_data.c */")
    out.append('#include "unicode.h"')
    out.append("")
    out.append("_Static_assert(MM_UCD_QC_BLOCK == %d && MM_UCD_QC_UNSAFE == %d, \"table shape\");"
               % (BLOCK, QC_NOT_SAFE))
    out.append("const uint32_t mm_ucd_qc_limit = 0x%X;" % limit)
    out.append(c_array("uint8_t", "mm_ucd_qc_stage1", stage1, 32, str))
    out.append(c_array("uint8_t", "mm_ucd_qc_stage2", stage2, 32, str))
    out.append("const size_t mm_ucd_decomp_count = %d;" % len(dkeys))
    out.append(c_array("uint32_t", "mm_ucd_decomp_cp", dkeys, 12, lambda v: "0x%X" % v))
    out.append(c_array("uint16_t", "mm_ucd_decomp_pos", dpos, 16, str))
    out.append(c_array("uint32_t", "mm_ucd_decomp_pool", pool, 12, lambda v: "0x%X" % v))
    out.append("const size_t mm_ucd_comp_count = %d;" % len(ckeys))
    out.append(c_array("uint64_t", "mm_ucd_comp_key", [(a << 21) | b for a, b in ckeys], 8,
                       lambda v: "0x%XULL" % v))
    out.append(c_array("uint32_t", "mm_ucd_comp_val", [comp[k] for k in ckeys], 12,
                       lambda v: "0x%X" % v))
    out.append("const size_t mm_ucd_age_count = %d;" % len(age_lo))
    out.append(c_array("uint32_t", "mm_ucd_age_lo", age_lo, 12, lambda v: "0x%X" % v))
    out.append(c_array("uint16_t", "mm_ucd_age_ver", age_ver, 16, str))
    out.append("const unsigned mm_ucd_version = %d;" % (ucd_version[0] * 100 + ucd_version[1]))
    out.append("const size_t mm_ucd_new_count = %d;" % len(fresh))
    out.append("const mm_ucd_new_range mm_ucd_new[%d] = {" % len(fresh))
    for i in range(0, len(fresh), 3):
        out.append("    " + " ".join('{0x%X, 0x%X, "%s", %d},' % (a, b, g, age[0] * 100 + age[1])
                                     for a, b, g, age in fresh[i:i + 3]))
    out.append("};")
    sys.stdout.write("\n".join(out) + "\n")
    sys.stderr.write("gen_unicode_data: limit 0x%X, %d blocks, %d decompositions (%d cps), "
                     "%d compositions, %d age ranges, %d new-code-point ranges\n"
                     % (limit, len(seen), len(dkeys), len(pool), len(ckeys), len(age_lo), len(fresh)))


if __name__ == "__main__":
    main()
