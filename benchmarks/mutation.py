"""Mutation testing of the holder core and the server's audit: how many deliberate breaks do the tests catch?

    pip install mutmut   # not a project dependency: a benchmark tool
    python -m benchmarks.mutation [--run core|holder] [--out runs/mutation] [--max-children 2]

mutmut changes one thing at a time in the modules below (an operator, a constant, a comparison, a return value)
and runs the tests that cover the changed function; a mutant the tests pass is a "survivor", a break nobody would
notice. The run happens in a temporary copy of the repository, so the working tree is never touched. It prints the
counts per module and the survivors, and writes them to --out/mutation.json.

Two runs, each with its own tests (`--run`):
- `core`: the math core and what decides what crosses (keys, morphing, AugConv, secrets, the holder's floor and the
  audit), against their unit and property tests;
- `holder`: the holder and its ClientApp (the holder, the ClientApp, DP accounting), against in-process federations
  (the real apps and strategies through a grid in this process, about a second each) and the unit tests that reach
  them. The Ray engine's tests are left out: 15 s or more per mutant, days on 2 cores.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["clients/keys.py", "clients/morphing.py", "clients/augconv.py", "clients/secrets.py", "clients/floor.py",
        "server/audit.py"]
CORE_TESTS = ["tests/test_keys.py", "tests/test_morphing.py", "tests/test_augconv.py", "tests/test_properties.py",
              "tests/test_secrets.py", "tests/test_audit.py", "tests/test_file_checks.py"]
HOLDER = ["clients/holder.py", "clients/client_app.py", "clients/privacy.py"]
HOLDER_TESTS = [
    "tests/test_holder.py", "tests/test_audit.py", "tests/test_secrets.py",
    "tests/test_dp.py::test_every_model_trains_a_dp_step_behind_a_frozen_augconv[cnn]",
    "tests/test_dp.py::test_a_round_trained_again_replaces_its_entry",
    "tests/test_dp.py::test_holder_dp_defaults_and_a_delta_too_large_for_the_holders",
    "tests/test_dp.py::test_per_sample_clipping_bounds_each_examples_contribution",
    "tests/test_dp.py::test_fedprox_proximal_gradient_is_added_after_the_noise",
    "tests/test_dp.py::test_epsilon_is_reported_per_holder_grows_with_rounds_and_equals_opacus_accountant",
    "tests/test_simulation.py::test_each_holder_builds_its_key_and_augconv_once",
    "tests/test_simulation.py::test_holder_local_layers_never_reach_the_server",
    "tests/test_simulation.py::test_no_message_carries_a_key_or_an_augconv",
    "tests/test_simulation.py::test_failed_holders_are_counted_and_the_round_goes_on",
    "tests/test_simulation.py::test_mple_matches_its_baseline_for_every_key_family[repeated]",
    "tests/test_simulation.py::test_fedprox_holders_apply_the_proximal_term",
    "tests/test_simulation.py::test_holder_shuffle_gives_each_holder_its_own_order_and_training_still_works",
    "tests/test_simulation.py::test_differential_privacy_clips_backbone_updates[client]",
    "tests/test_reliability.py::test_holders_are_created_only_when_sampled",
    "tests/test_reliability.py::test_holders_index_one_dataset_per_process_and_the_cache_is_bounded",
    "tests/test_reliability.py::test_evaluation_uses_the_local_layers_each_holder_trained_this_round",
    "tests/test_reliability.py::test_holders_without_test_images_do_not_stop_the_run",
    "tests/test_partitions.py::test_each_site_scores_the_final_model_on_its_own_test_images",
    "tests/test_deployment.py::test_holders_use_the_folder_and_data_their_node_config_names",
    "tests/test_deployment.py::test_a_holder_file_of_another_shape_or_more_classes_is_refused",
    "tests/test_gradient_inversion.py::test_the_clientapps_own_align_reply_gives_the_server_the_federation_order_exactly",
]
RUNS = {"core": (CORE, CORE_TESTS), "holder": (HOLDER, HOLDER_TESTS)}
STATUS = re.compile(r"^\s*(?P<name>[\w.]+__mutmut_\d+): (?P<status>[\w ]+)$")


def copy_repository(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def configure(target: Path, max_children: int, modules: list[str], tests: list[str]) -> None:
    (target / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths =\n" + "".join(f"    {path}\n" for path in modules)
        + "also_copy =\n    simulation/\n    server/\n    strategies/\n    clients/\n    configs/\n    tests/\n"
        + "pytest_add_cli_args_test_selection =\n" + "".join(f"    {path}\n" for path in tests)
        + "pytest_add_cli_args =\n    -x\n    -q\n    -p\n    no:cacheprovider\n"
        + f"max_children = {max_children}\n"
    )
    # mutmut hands pytest a mutant's covering tests in no particular order and stops at the first failure (-x): the
    # copy's conftest runs them in the run's listed order instead, fast unit tests before federations, so that a
    # mutant dies in seconds rather than after every slow test that cannot catch it.
    with open(target / "tests" / "conftest.py", "a") as conftest:
        conftest.write(
            "\n\n# Added by benchmarks.mutation in its working copy only.\n"
            f"_MUTATION_ORDER = {tests!r}\n\n\n"
            "def pytest_collection_modifyitems(session, config, items):\n"
            "    def rank(item):\n"
            "        return next((index for index, name in enumerate(_MUTATION_ORDER)\n"
            "                     if item.nodeid == name or item.nodeid.startswith((name + '::', name + '['))), "
            "len(_MUTATION_ORDER))\n"
            "    items.sort(key=rank)\n")


# ---------------------------------------------------------------- what each survivor changed, and why it lives
def mutant_changes(work: Path, names: list[str]) -> dict[str, tuple[str, str]]:
    """(removed, added) source of each mutant against its function's original, read from mutmut's mutants/ folder
    (mutmut keeps every mutant as a function beside the original)."""
    functions: dict[str, dict[str, list[str]]] = {}
    changes = {}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            path = work / "mutants" / ("/".join(parts[:cut]) + ".py")
            if path.is_file():
                module, function = "/".join(parts[:cut]), ".".join(parts[cut:])
                break
        else:
            continue
        if module not in functions:
            lines = path.read_text().splitlines()
            functions[module] = {node.name: lines[node.lineno - 1:node.end_lineno] for node in
                                 ast.walk(ast.parse("\n".join(lines))) if isinstance(node, ast.FunctionDef)}
        base = function.rsplit("__mutmut_", 1)[0]
        original = [line.replace(f"{base}__mutmut_orig", base) for line in functions[module].get(f"{base}__mutmut_orig", [])]
        mutant = [line.replace(function, base) for line in functions[module].get(function, [])]
        delta = [line for line in difflib.unified_diff(original, mutant, lineterm="", n=0)
                 if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        changes[name] = (" ".join(line[1:].strip() for line in delta if line[0] == "-"),
                         " ".join(line[1:].strip() for line in delta if line[0] == "+"))
    return changes


_STRING = re.compile(r"""(["'])(?:(?!\1).)*\1""")
_TALKS = re.compile(r"raise |warn\(|Error\(|_check_\w+\(|_only\(|progress\(|^f?[\"']|^\)|error_message")


_MESSAGE_ARGUMENT = re.compile(r'(f?"[^"]*" *)+|None')


def _only_text(removed: str, added: str) -> bool:
    return _STRING.sub('""', removed) == _STRING.sub('""', added)


# (group, test on (function, removed, added), why the tests let it live). The first that matches is the group.
GROUPS = [
    ("message text", lambda f, r, a: (_only_text(r, a) or _MESSAGE_ARGUMENT.sub("_", r) == _MESSAGE_ARGUMENT.sub("_", a))
     and (_TALKS.search(r) or f.split("__mutmut")[0].endswith(("_short", "_preview", "extra_repr", "_check_choice"))),
     "changes only the wording of an error, warning or description (text wrapped in XX, upper-cased, a label or "
     "separator dropped): the tests match each message by the fragment that names the problem and the fix, not "
     "letter for letter"),
    ("message formatting", lambda f, r, a: f.split("__mutmut")[0].endswith(("_short", "_preview", "extra_repr")),
     "changes how a value is abbreviated in a message or a layer's description (a length limit, an ellipsis)"),
    ("warning stack level", lambda f, r, a: "stacklevel" in r + a,
     "changes which caller a warning names (warnings.warn's stacklevel): the warning itself is tested"),
    ("threshold equality", lambda f, r, a: re.sub(r">=|<=", lambda m: m.group()[0], a) == r
     and re.search(r"[<>]=? *([A-Z_]{3,}|\d+\.\d*)", r) is not None,
     "moves a bound on a float (a condition number, an error) from > to >=: only a value exactly on the bound "
     "tells them apart, and none is"),
    ("same as the default", lambda f, r, a: re.search(r"token_(bytes|hex)\(SECRET_BYTES\)", r) is not None
     or "download=False" in r and _changed_tokens(r, a) <= {"download", "False", "None", "=", ","}
     or "map_location" in r or re.search(r"dtype=np\.int64", r) is not None
     or re.search(r'allow_pickle=False|indexing="ij"', r) is not None and _changed_tokens(r, a) <= {
         "allow_pickle", "False", "None", "indexing", '"', "ij", "=", ",", ")"},
     "passes None or drops an argument whose default is the same here: token_bytes/token_hex default to 32 bytes "
     "(SECRET_BYTES), a loader's download defaults to off (None is off too), tensors are saved from the CPU so map_location changes nothing, numpy makes int64 of "
     "Python ints, np.load refuses pickles by default, torch.meshgrid indexes 'ij' by default"),
    ("format detail kept by writer and reader", lambda f, r, a: "sort_keys" in r or "ZIP_STORED" in r
     or 'to_bytes(8, "little")' in r,
     "changes a detail of the file format that the writer and the reader share (key order of the JSON header, zip "
     "compression, the byte order of a length in the tag): files still round-trip and tags still fail on an edit; "
     "only a file written by another version would tell"),
    ("diagnostic estimate", lambda f, r, a: "expected_float32_error" in f,
     "changes the sampled estimate of float32 error printed in the key table (its seed, dtype of the estimate): "
     "tests check its order of magnitude against the measured error, not its digits"),
    ("domain-separation label", lambda f, r, a: (_only_text(r, a) or re.sub(r'"[^"]*"', "None", r) == a)
     and re.search(r"seed\(|_derive|federation_seed", r),
     "renames the label from which a secret seed is derived: any fixed label gives an equally secret, "
     "reproducible seed; tests check that seeds are reproducible and distinct per purpose and holder"),
]


def _changed_tokens(removed: str, added: str) -> set[str]:
    before, after = re.findall(r"\w+|\S", removed), re.findall(r"\w+|\S", added)
    changed = set()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=before, b=after).get_opcodes():
        if tag != "equal":
            changed |= set(before[i1:i2]) | set(after[j1:j2])
    return changed


_DEVICE_TOKENS = {"device", "self", "None", "images", "weight", "conv", "cpu", "torch", "str", "to", "=", ".", ",", "(", ")",
                  '"', "fused", "layout", "block_index", "bias"}
# Mutants that no rule above covers, explained one function (or one mutant) at a time.
EXPLAINED = {
    "x__place_row_ranges": "only the layout of a key with one block over the whole image places ranges of rows, "
    "and it has one group: group * group_rows is 0 and the group's own rows bound the output rows, so these terms "
    "and the empty-range guard cannot change what is placed",
    "xǁSecurityFloorǁcheck_key__mutmut_14": "counts the nonzero entries per column instead of per row: a block "
    "with at most one nonzero in each row is invertible only as a scaled permutation, which has one per column too",
    "xǁSecurityFloorǁcheck_key__mutmut_15": "the same as mutmut_14 (dim=-2 is the column axis of the blocks)",
    "xǁ_KeyShapeǁblock_for": "_KeyShape stands in for a key only where AugConv's size is asked (augconv_bytes): "
                             "which key block each layout block reads does not change the weight's size",
    "xǁHolderKeyǁmatrix__mutmut_5": "a dense key has one block, and block_diag of one block is that block: the "
    "dense branch is a shortcut",
    "xǁHolderKeyǁmatrix__mutmut_6": "the same as mutmut_5",
    "x__federation_from_hex__mutmut_5": "the placeholder for text that is not hex: any value of the wrong length "
    "leads to the same refusal",
    "x_channel_order__mutmut_12": "the label the federation order's seed is derived from becomes None, which "
    "str() makes another fixed label: the order stays secret, shared and reproducible",
    "x_channel_order__mutmut_18": "the same for a holder's own order",
    "x_draw_key__mutmut_13": "the same for the key's seed",
    "x__fused_weight__mutmut_32": "sizes AugConv's construction window larger than needed: the extra rows are zero, the same entries are computed",
    "x__fused_weight__mutmut_33": 'the same (a window over every row)',
    "x__fused_weight__mutmut_35": 'the same (one row more)',
    "x__fused_weight__mutmut_49": 'changes the byte count that sizes construction chunks: memory only, the same entries',
    "x__fused_weight__mutmut_60": 'the same (chunks of at least 2 rows)',
    "x__place_single_rows": 'the guard for response rows outside the computed window: the window is computed to hold every row placed, so in every geometry the tests draw (random shapes, kernels, paddings, families) no row falls outside; the guard is defensive',
    "x__receptive_rows__mutmut_3": 'group / group_rows equals group * group_rows when group_rows is 1, the only value this path gets in every geometry the tests draw; not proven equivalent in general',
    "x__shared_layout__mutmut_10": 'an exact division written with /: q divides the period, the value is the same',
    "x__shared_layout__mutmut_12": 'an exact division written with /: q divides the plane, the value is the same',
    "x__shared_layout__mutmut_15": 'groups from output rows * group_rows instead of /: the same when group_rows is 1, and extra groups beyond the output are cropped; not proven equivalent in general',
    "x__shared_layout__mutmut_32": "widens the range of candidate blocks searched for each group: candidates that do not overlap the group's receptive rows are filtered out, the layout is the same",
    "x__shared_layout__mutmut_34": 'the same (one candidate more)',
    "x__shared_layout__mutmut_37": 'the same (a wider range)',
    "x__shared_layout__mutmut_40": 'the same (a wider range)',
    "x__shared_layout__mutmut_41": 'the same (one candidate more)',
    "x__shared_layout__mutmut_56": "a block's bottom row computed one pixel lower only matters for blocks that end exactly on a row boundary, which then still overlap the same group; not proven equivalent in general",
    "x__tensor_bytes__mutmut_2": "the tag still covers every byte of every tensor; it no longer binds dtypes and shapes, and a file edited to keep the bytes but change a shape is then refused by the layer's own shape checks when it is built",
    "x__tensor_bytes__mutmut_3": 'the same for dtypes',
    "x_augconv_bytes__mutmut_17": "the block-layout formula gives a dense key's size too (one block, one group): the dense branch is a shortcut",
    "x_augconv_bytes__mutmut_18": 'the same',
    "xǁAugConvǁforward__mutmut_109": 'a bias viewed as (C, 1, 1) broadcasts over (B, C, H, W) as (1, C, 1, 1) does',
    "xǁAugConvǁforward__mutmut_35": 'pads two all-zero blocks instead of one: the empty slots index the first, the second is never read',
    "xǁAugConvǁforward__mutmut_99": 'decides whether to crop the output to its height: cropping an output that already has that height changes nothing',
    "xǁAugConvǁfrom_conv__mutmut_60": 'the device argument on a CPU-only machine (.to(None) keeps the CPU)',
    "xǁAugConvǁfrom_conv__mutmut_62": 'the same',
    "x__resolve_block_size__mutmut_27": 'lists divisors up to N + 1, which never divides N: the same list',
    "x_condition_number__mutmut_11": "float('INF') is infinity too",
    "x_condition_number__mutmut_6": 'for a singular block the smallest eigenvalue is 0 and the division gives infinity anyway',
    "x_condition_number__mutmut_7": 'the same (a zero eigenvalue gives infinity through the division)',
    "xǁHolderKeyǁ_validate__mutmut_26": 'placeholder sizes for blocks that are not 3-D: any of these placeholders fails the square check that follows',
    "xǁHolderKeyǁ_validate__mutmut_27": 'the same',
    "xǁHolderKeyǁ_validate__mutmut_28": 'the same',
    "xǁHolderKeyǁ_validate__mutmut_29": 'the same',
    "xǁHolderKeyǁ_validate__mutmut_35": 'checks that q divides N without the family: for valid keys the same, and the count check that follows refuses the same keys',
    "xǁHolderKeyǁ_validate__mutmut_36": 'the same without q',
    "xǁHolderKeyǁsave__mutmut_20": "np.save pickles only object arrays; a key's blocks are float64, so allowing it changes nothing written",
    "x_morph__mutmut_22": 'inverse=None is false, as inverse=False',
    "x__derive__mutmut_3": 'another separator between derivation labels: seeds stay distinct per label and secret, and reproducible',
    "x__derive__mutmut_9": "reads the HMAC's first 8 bytes big-endian (from_bytes' default) instead of little-endian: an equally uniform 63-bit seed",
    "x__seed_value__mutmut_2": 'a boolean seed then goes through int(str(True)), which raises, and is refused the same',
    "x__seed_value__mutmut_5": 'any negative placeholder is refused the same',
    "x__seed_value__mutmut_10": 'the same',
    # The holder run.
    "xǁHolderǁpoisson_batches__mutmut_25": "torch.rand draws from [0, 1): an image whose draw equals the sample rate "
                                           "exactly (probability 2^-24 per image) is the only one < and <= tell apart",
    "xǁHolderJobǁ_open_holder__mutmut_31": "changes the default used when the node config names no federation secret; the holders then reach this line only with a holder seed, which decides their secrets and leaves the federation secret unused: equivalent",
    "xǁHolderJobǁ_open_holder__mutmut_33": "the same as mutmut_31",
    "xǁHolderJobǁ_open_holder__mutmut_36": "the same as mutmut_31",
    "xǁHolderJobǁ_assemble__mutmut_19": "loads the received entries in the plain order and permutes them too when they are already in the holder's order: the next line loads them again in the holder's order, overwriting that copy, and the permutation is applied to the skeleton's plain first layer, which the holder never uses (its own AugConv or frozen layer is)",
    "xǁHolderJobǁ_assemble__mutmut_29": "strict=None is falsy: load_state_dict is as lenient as with strict=False",
    "xǁHolderJobǁ_assemble__mutmut_38": "the same",
    "xǁHolderJobǁ_assemble__mutmut_4": "bool(None) is False, the default's value",
    "xǁHolderJobǁ_assemble__mutmut_6": "the same (get's own default is None)",
    "xǁHolderCacheǁget__mutmut_6": "popitem(last=None) is popitem(last=False): None is falsy, the oldest holder goes",
    "xǁHolderǁload_local_state__mutmut_5": "map_location=None: the local state is saved from the CPU, so it loads there anyway",
    "xǁHolderǁload_local_state__mutmut_8": "the same (map_location left out)",
    "xǁHolderǁload_local_state__mutmut_6": "weights_only=None is torch's default, which is True since torch 2.6 (this project needs 2.14)",
    "xǁHolderǁload_local_state__mutmut_9": "the same (weights_only left out)",
    "xǁHolderǁpoisson_batches__mutmut_45": "a batch size above the count of images chosen still gives one batch of "
                                           "all of them, the only batch taken",
    "xǁHolderǁ_saved_rounds__mutmut_6": "a local-state file's stem holds '-r' once (local-<variant>-rNNNNN, and the "
                                        "variants are mple and baseline): split from either end, any count, the same",
    "xǁHolderǁ_saved_rounds__mutmut_7": "the same (split from the left)",
    "xǁHolderǁ_saved_rounds__mutmut_10": "the same (at most two splits)",
    "x_dp_plan__mutmut_23": "no message: silences every warning of the noise search, which issues only one",
    "x_dp_plan__mutmut_39": "get_noise_multiplier's accountant defaults to rdp, the one named",
    "x_dp_plan__mutmut_27": "warnings.filterwarnings matches its message case-insensitively: the same filter",
    "x_dp_plan__mutmut_28": "the same (upper case)",
    "x_key_padding__mutmut_13": "padding[1] instead of padding[0]: the line above refuses a layer whose two "
                                "paddings differ, so they are the same number",
    "xǁPrivacyLedgerǁepsilon__mutmut_4": "Opacus' RDP accountant gives epsilon 0 for an empty history too: the guard "
                                         "only spares the import",
}

GROUPS += [
    ("device on a CPU-only machine", lambda f, r, a: "device" in r and bool(_changed_tokens(r, a))
     and _changed_tokens(r, a) <= _DEVICE_TOKENS,
     "drops or changes a device argument (.to(device), device=...): on this CPU-only machine every tensor is on the "
     "CPU anyway; benchmarks/gpu.py runs the same code on CUDA"),
    ("dtype already so", lambda f, r, a: re.search(r"dtype=|astype\(", r) is not None
     and _changed_tokens(r, a) <= {"dtype", "None", "np", "float64", "int64", "torch", "=", ".", ",", "astype", "(",
                                    ")"},
     "drops a dtype argument where the value already has that dtype (float64 key blocks, int64 indices): the "
     "exactness tests at float64 tolerance would fail on a real change of precision"),
    ("einsum subscript case", lambda f, r, a: "einsum" in r and r.lower() == a.lower(),
     "upper-cases torch.einsum's subscripts, which torch accepts as the same subscripts"),
    ("chunk size only", lambda f, r, a: f.startswith("x__chunks"),
     "changes how AugConv's construction is cut into chunks (chunk bounds, steps, overlap): chunking bounds memory, "
     "and smaller, larger or overlapping chunks write the same values (the chunked-construction tests compare "
     "the result, exactly, with the unchunked one)"),
    ("key distribution detail", lambda f, r, a: f.startswith(("x__draw_block", "x_default_max_condition")),
     "changes the distribution keys are drawn from (the integer entry range, the condition bound's constant or "
     "whether the bound is inclusive): any key drawn is still a valid, well-conditioned key; tests check "
     "invertibility, the bound's scale and the float32 error it gives, not the exact distribution"),
    ("cache only", lambda f, r, a: "_conditions" in r or "setflags" in r or "_torch_cache" in r,
     "drops a cache (condition numbers, converted blocks) that is recomputed when missing, or the read-only flag "
     "on a key's blocks, which nothing writes to"),
]


ONE_BY_ONE, NOT_EXPLAINED = "explained one by one", "not explained"
# The groups no rule in GROUPS makes: each mutant of the first has its own reason (EXPLAINED), the second has none.
OTHER_GROUP_REASONS = {ONE_BY_ONE: "each with its own reason",
                       NOT_EXPLAINED: "inspect it: kill it with a test, or explain it here"}


def explain(name: str, removed: str, added: str) -> tuple[str, str]:
    function = name.rsplit(".", 1)[-1]
    for known, reason in EXPLAINED.items():
        if function == known or function.rsplit("__mutmut_", 1)[0] == known:
            return ONE_BY_ONE, reason
    for group, matches, reason in GROUPS:
        if matches(function, removed, added):
            return group, reason
    return NOT_EXPLAINED, OTHER_GROUP_REASONS[NOT_EXPLAINED]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/mutation"))
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--run", choices=sorted(RUNS), default="core",
                        help="core: " + ", ".join(CORE) + "; holder: " + ", ".join(HOLDER) + " (default core)")
    parser.add_argument("--modules", nargs="+", choices=CORE + HOLDER, metavar="FILE",
                        help="mutate only these of the run's files (default: all of them)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep mutmut's working copy in this folder, so a stopped run resumes where it stopped "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--only", type=Path, metavar="FILE",
                        help="test only the mutants named in FILE, one per line (with --work: the survivors of an "
                             "earlier run, against new tests)")
    parser.add_argument("--report-only", action="store_true", help="with --work: report what mutmut has, run nothing")
    args = parser.parse_args(argv)
    modules, tests = RUNS[args.run]
    if args.modules:
        if not set(args.modules) <= set(modules):
            parser.error(f"--modules of the {args.run} run are among: " + ", ".join(modules))
        modules = args.modules
    if shutil.which("mutmut") is None and not Path(sys.executable).with_name("mutmut").exists():
        print("error: mutmut is not installed; pip install mutmut", file=sys.stderr)
        return 2
    mutmut = str(Path(sys.executable).with_name("mutmut")) if Path(sys.executable).with_name("mutmut").exists() \
        else shutil.which("mutmut")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mple-mutation-") as folder:
        work = args.work or Path(folder)
        if not (work / "setup.cfg").exists():
            work.mkdir(parents=True, exist_ok=True)
            copy_repository(work)
            configure(work, args.max_children, modules, tests)
        names = args.only.read_text().split() if args.only else []
        if not args.report_only:
            subprocess.run([mutmut, "run", "--max-children", str(args.max_children), *names], cwd=work, text=True)
        listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, text=True, capture_output=True)
        statuses = {}
        for line in listing.stdout.splitlines():
            match = STATUS.match(line)
            if match:
                statuses[match["name"]] = match["status"].strip()
        if not statuses:
            print("error: mutmut reported no mutants; its output is above", file=sys.stderr)
            return 1
        changes = mutant_changes(work, sorted(name for name, status in statuses.items() if status == "survived"))
    per_module: dict[str, dict[str, int]] = {}
    for name, status in statuses.items():
        module = re.split(r"\.x[_ǁ]", name)[0]
        per_module.setdefault(module, {}).setdefault(status, 0)
        per_module[module][status] += 1
    survivors = []
    for name in sorted(changes):
        group, reason = explain(name, *changes[name])
        survivors.append({"mutant": name, "removed": changes[name][0], "added": changes[name][1], "group": group,
                          "why": reason})
    groups: dict[str, int] = {}
    for survivor in survivors:
        groups[survivor["group"]] = groups.get(survivor["group"], 0) + 1
    killed = sum(status == "killed" for status in statuses.values())
    figures = {"mutants": len(statuses), "killed": killed, "survived": len(survivors),
               "other": len(statuses) - killed - len(survivors), "per_module": per_module,
               "survivor_groups": groups, "survivors": survivors,
               "seconds": round(time.monotonic() - started, 1), "run": args.run,
               "modules": modules, "tests": tests}
    print(f"{len(statuses)} mutants: {killed} killed, {len(survivors)} survived, {figures['other']} other "
          f"(no tests: functions no test calls) in {figures['seconds']:.0f} s")
    for module, counts in sorted(per_module.items()):
        print(f"  {module}: " + ", ".join(f"{status} {count}" for status, count in sorted(counts.items())))
    print("survivors by why they live:")
    for group, count in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"  {count:4d}  {group}")
    for survivor in survivors:
        if survivor["group"] == NOT_EXPLAINED:
            print(f"  not explained: {survivor['mutant']}: - {survivor['removed'][:100]}  + {survivor['added'][:100]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutation.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "survivors.md").write_text(survivors_markdown(figures))
    print(f"results: {args.out / 'mutation.json'}, {args.out / 'survivors.md'}")
    return 0


def survivors_markdown(figures: dict) -> str:
    lines = [f"# Surviving mutants: {figures['survived']} of {figures['mutants']}", "",
             f"{figures['killed']} killed, {figures['other']} without a covering test. Grouped by why the tests let "
             "them live; each group's reason, then its mutants (what was removed, what was put in).", ""]
    reasons = {group: why for group, _, why in GROUPS} | OTHER_GROUP_REASONS
    for group, count in sorted(figures["survivor_groups"].items(), key=lambda item: -item[1]):
        lines += [f"## {group} ({count})", "", reasons.get(group, ""), ""]
        lines += [f"- `{s['mutant']}`: `{s['removed'][:140]}` -> `{s['added'][:140]}`"
                  + (f": {s['why']}" if s["why"] != reasons[group] else "")
                  for s in figures["survivors"] if s["group"] == group]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
