"""experiments/sass_relation_kl.py on CPU: the SASS reader and the per-pair arithmetic on a small
hand-written listing in Mosaic's dump format, the CLI's refusals, and the Mosaic kernels' names
(the reader found the one-kernel backward compiled as JAX's `new_body`). Compiling to SASS needs
JAX's CUDA plugin and nvdisasm (the module's docstring); CI has neither, so that path is checked
only where they are installed."""

import pytest

from experiments import sass_relation_kl as sass

# One warp's listing: set-up, a loop of two 64x64x16 HGMMAs (one group, waited on after one more
# instruction), four exponentials, eight FP32 ops, two ALU ops, then an out-of-line barrier retry
# at the end that branches back into the kernel (not a main loop: its range holds the EXIT).
LISTING = """
        .global         k_mosaic_gpu_kernel
   -:-:-:Y:01        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
   -:-:-:Y:01        /*0010*/                   WARPGROUP.ARRIVE ;
   -:-:-:Y:01        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
   -:-:-:Y:04        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
   -:-:-:Y:02        /*0040*/                   UIADD3 UR6, UR19, 0x21030, URZ ;
   -:-:-:-:02        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
.L_x_1:
   -:-:1:Y:02        /*0060*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR6], R21 ;
   1:-:-:Y:05        /*0070*/              @!P1 BRA `(.L_x_9) ;
   -:-:-:Y:01        /*0080*/                   FFMA R2, R24, R3, -R4 ;
   -:-:-:Y:01        /*0090*/                   FFMA R5, R25, R3, -R4 ;
   -:-:-:Y:01        /*00a0*/                   FADD R6, R2, R5 ;
   -:-:-:Y:01        /*00b0*/                   FADD R7, R6, R5 ;
   -:-:-:Y:01        /*00c0*/                   FMUL R8, R7, R5 ;
   -:-:-:Y:01        /*00d0*/                   FMUL R9, R8, R5 ;
   -:-:-:Y:01        /*00e0*/                   FFMA R10, R9, R3, -R4 ;
   -:-:-:Y:01        /*00f0*/                   FADD R11, R10, R5 ;
   -:-:-:Y:01        /*0100*/                   FMNMX.NAN R12, R11, R5, !PT ;
   -:-:-:Y:01        /*0110*/                   ISETP.GE.AND P0, PT, R12, 0x3, PT ;
   -:-:-:Y:08        /*0120*/                   MUFU.EX2 R13, R2 ;
   -:-:-:Y:08        /*0130*/                   MUFU.EX2 R14, R5 ;
   -:-:-:Y:08        /*0140*/                   MUFU.EX2 R15, R6 ;
   -:-:-:Y:08        /*0150*/                   MUFU.EX2 R16, R7 ;
   -:-:-:Y:05        /*0160*/              @P0 BRA `(.L_x_0) ;
   -:-:-:Y:05        /*0170*/                   EXIT ;
.L_x_9:
   -:-:1:Y:02        /*0180*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR6], R21 ;
   1:-:-:Y:05        /*0190*/                   BRA `(.L_x_1) ;
"""


def test_the_listing_is_read_into_instructions_and_labels():
    instructions, labels = sass.parse_sass(LISTING)
    assert len(instructions) == 26
    assert labels == {".L_x_0": 0x10, ".L_x_1": 0x60, ".L_x_9": 0x180}
    address, stall, op, _ = instructions[2]
    assert (address, stall, op) == (0x20, 1, "HGMMA.64x64x16.F32.BF16")
    assert sass.opcode("@!P1 BRA `(.L_x_9)") == "BRA"  # the predicate is not the opcode


@pytest.mark.parametrize(
    "op,unit",
    [
        ("FFMA", "fp32"),
        ("FMNMX.NAN", "alu"),
        ("MUFU.EX2", "mufu"),
        ("HGMMA.64x64x16.F32.BF16", "tensor"),
        ("F2FP.BF16.F32.PACK_AB", "cvt"),
        ("UIADD3.64", "uniform"),
        ("IMAD.MOV.U32", "imad"),
        ("SYNCS.ARRIVE.TRANS64", "other"),
    ],
)
def test_opcodes_go_to_their_units(op, unit):
    assert sass.unit_of(op) == unit


def test_the_main_loop_is_found_and_the_barrier_retry_is_not():
    instructions, labels = sass.parse_sass(LISTING)
    assert sass.main_loops(instructions, labels) == [(0x10, 0x160)]


def test_per_pair_arithmetic_of_the_loop():
    report = sass.kernel_report(LISTING, "ptxas info    : Used 168 registers, used 16 barriers", pairs_per_step=64 * 64)
    assert report["ptxas"] == {"registers": 168, "barriers": 16}
    (loop,) = report["loops"]
    body_len = (0x160 - 0x10) // 0x10 + 1
    assert loop["instructions"] == body_len == 22
    per_pair = 4 / 4096  # 4 warps of the warpgroup run the body once for 64x64 pairs
    # 4 MUFU instructions: 4 x 32 lanes / 16 lanes a clock, per pair
    assert loop["sm_clocks_per_pair"]["mufu"] == pytest.approx(4 * per_pair * 32 / 16, abs=1e-6)
    assert loop["sm_clocks_per_pair"]["fp32"] == pytest.approx(8 * per_pair * 32 / 128, abs=1e-6)
    assert loop["sm_clocks_per_pair"]["alu"] == pytest.approx(2 * per_pair * 32 / 64, abs=1e-6)
    # two 64x64x16 HGMMAs = 131072 FMAs per 4096 pairs, 2048 FMAs a clock
    assert loop["tensor_fma_per_pair"] == 32.0
    assert loop["sm_clocks_per_pair"]["tensor"] == pytest.approx(32 / 2048, abs=1e-6)
    assert loop["sm_clocks_per_pair"]["issue"] == pytest.approx(22 * per_pair / 4, abs=1e-6)
    assert loop["bound_unit"] == "tensor"  # 0.0156 clocks a pair against the MUFU's 0.0078
    stall = sum(s for a, s, _, _ in sass.parse_sass(LISTING)[0] if 0x10 <= a <= 0x160)
    assert loop["stall_sum"] == stall
    assert loop["stall_clocks_per_pair"] == pytest.approx(stall / (2 * 4096), abs=1e-6)
    # one group of 2 HGMMAs, waited on after one more instruction (stall 2); its window: the
    # second HGMMA (stall 4) and that instruction, no exponential
    assert loop["hgmma_groups"] == [
        {
            "hgmma": 2,
            "fma": 2 * 64 * 64 * 16,
            "instructions_before_wait": 1,
            "window_instructions": 2,
            "window_cycles": 6,
            "window_mufu": 0,
        }
    ]
    assert not loop["masked"]


def test_unknown_or_two_kernel_variants_are_refused(capsys):
    with pytest.raises(SystemExit):
        sass.main(["--variants", "fused_64x64,nope"])
    assert "unknown variant 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sass.main(["--variants", "skip_64x64"])
    assert "two-kernel backward" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sass.main(["--kernels", "fwd,dleft"])
    assert "unknown kernel 'dleft'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sass.main(["--triton", "plain,fused"])
    assert "'fused' is neither 'plain' nor a boolean BlockSizes field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sass.main(["--triton", "--head_dims", "96"])
    assert "no shape for head dim 96" in capsys.readouterr().err


def _modules(monkeypatch, kind, head_dim=64):
    """The Mosaic modules (serialized MLIR) that lowering one kernel for "cuda" produces (the
    lowering records each in `KNOWN_KERNELS`, emptied here so that earlier tests' do not count)."""
    from jax.experimental.mosaic.gpu import core

    monkeypatch.setattr(core, "KNOWN_KERNELS", {})
    fn, args = sass._lowerable("fused_64x64", head_dim, 256)[kind]
    fn.trace(*args).lower(lowering_platforms=("cuda",))
    return list(core.KNOWN_KERNELS.values())


@pytest.mark.parametrize("kind,name", [("fwd", b"relation_kl_mgpu_fwd"), ("bwd", b"relation_kl_mgpu_dfused")])
def test_the_mosaic_kernels_carry_their_names(monkeypatch, kind, name):
    # a profile (experiments/trace_summary.py) counts a kernel as the relation loss by its name;
    # the one-kernel backward used to compile as JAX's `new_body_mosaic_gpu_kernel`
    (module,) = _modules(monkeypatch, kind)
    assert name in module and b"new_body" not in module


def test_sass_of_the_forward_where_the_cuda_plugin_is_installed(tmp_path):
    try:
        import jax_plugins  # noqa: F401

        sass._cuda_root()
    except (ImportError, sass.SetupError):
        pytest.skip("needs JAX's CUDA plugin and nvdisasm (experiments/sass_relation_kl.py)")
    result = sass.main(
        ["--variants", "fused_64x64", "--head_dims", "64", "--kernels", "fwd", "--out", str(tmp_path / "s.json")]
    )
    (row,) = result["rows"]
    assert row["ptxas"]["registers"] > 0 and len(row["loops"]) == 2  # the unmasked and the diagonal steps
    assert all(loop["sm_clocks_per_pair"]["mufu"] > 0 for loop in row["loops"])


def test_a_wgmma_group_left_in_flight_is_waited_on_in_the_next_step():
    # the group is issued at the loop's end and waited on after the loop's first two instructions
    listing = """
.L_x_0:
   -:-:-:Y:01        /*0000*/                   FADD R6, R2, R5 ;
   -:-:-:Y:01        /*0010*/                   FADD R7, R6, R5 ;
   -:-:-:-:02        /*0020*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
   -:-:-:Y:08        /*0030*/                   MUFU.EX2 R13, R2 ;
   -:-:-:Y:01        /*0040*/                   WARPGROUP.ARRIVE ;
   -:-:-:Y:01        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
   -:-:-:Y:05        /*0060*/              @P0 BRA `(.L_x_0) ;
   -:-:-:Y:05        /*0070*/                   EXIT ;
"""
    (loop,) = sass.kernel_report(listing, "", pairs_per_step=64 * 64)["loops"]
    # after the HGMMA: the branch, then FADD, FADD around the back edge
    (group,) = loop["hgmma_groups"]
    assert (group["hgmma"], group["fma"], group["instructions_before_wait"]) == (1, 64 * 128 * 16, 3)
    assert (group["window_instructions"], group["window_cycles"], group["window_mufu"]) == (3, 7, 0)
    assert loop["tensor_fma_per_pair"] == 32.0


def test_the_serial_and_alternating_models_bracket_the_step():
    (loop,) = sass.kernel_report(LISTING, "", pairs_per_step=64 * 64)["loops"]
    tensor_step = 2 * 64 * 64 * 16 / 2048  # one warpgroup's two HGMMAs on the SM's tensor cores
    assert loop["tensor_clocks_per_step"] == tensor_step == 64
    exposed = tensor_step - 6  # less the cycles the warp issues inside the group's window
    assert loop["exposed_tensor_clocks_per_step"] == exposed
    assert loop["serial_clocks_per_pair"] == pytest.approx((exposed + loop["stall_sum"]) / 4096, abs=1e-6)
    alternating = max((exposed + loop["stall_sum"]) / (2 * 4096), *loop["sm_clocks_per_pair"].values())
    assert loop["alternating_clocks_per_pair"] == pytest.approx(alternating, abs=1e-6)
    assert loop["alternating_clocks_per_pair"] <= loop["serial_clocks_per_pair"]


# Five instructions of the Mosaic forward as `nvdisasm -hex -c` prints them (ptxas 13.0), and the
# control fields Mosaic's own SASS_CTRL listing gives them (the whole kernel agrees, 1,920 of 1,920).
NVDISASM_HEX = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                              /* 0x00000a00ff017b82 */
                                                                                       /* 0x000fe20000000800 */
        /*0010*/                   S2R R8, SR_TID.X ;                                  /* 0x0000000000087919 */
                                                                                       /* 0x000e6e0000002100 */
        /*00c0*/                   ULEA UR31, UR4, UR31, 0x18 ;                        /* 0x0000001f041f7291 */
                                                                                       /* 0x004fc8000f8ec03f */
        /*00f0*/                   SHF.R.U32.HI R0, RZ, 0x5, R8.reuse ;                /* 0x00000005ff007819 */
                                                                                       /* 0x102fe20000011608 */
.L_x_7:
        /*5e20*/                   FADD R17, -R18, R21 ;                               /* 0x0000001512117221 */
                                                                                       /* 0x032fe20000000100 */
"""
MOSAIC_CTRL = ["-:-:-:Y:01", "-:-:1:Y:07", "2:-:-:-:04", "1:-:-:Y:01", "0x32:-:-:Y:01"]


def test_control_codes_decode_as_mosaic_lists_them():
    listing = sass.control_listing(NVDISASM_HEX)
    ctrl = [line.split()[0] for line in listing.splitlines() if "/*" in line]
    assert ctrl == MOSAIC_CTRL
    instructions, labels = sass.parse_sass(listing)
    assert [(a, s, op) for a, s, op, _ in instructions] == [
        (0x0, 1, "LDC"),
        (0x10, 7, "S2R"),
        (0xC0, 4, "ULEA"),
        (0xF0, 1, "SHF.R.U32.HI"),
        (0x5E20, 1, "FADD"),
    ]
    assert labels == {".L_x_7": 0x5E20}


def test_programs_per_sm_by_registers():
    assert sass.ctas_per_sm(255, 4) == 2  # 256 registers a thread, 128 threads: 32K of 64K
    assert sass.ctas_per_sm(138, 4) == 3  # rounded up to 144
    assert sass.ctas_per_sm(168, 8) == 1


def test_a_wgmma_under_the_softmax_is_not_counted_twice():
    # the group's window holds 3 exponentials of 8 stall cycles each: 24 of the HGMMA's 64
    # tensor clocks pass while the warp issues them, 40 are left exposed
    listing = """
.L_x_0:
   -:-:-:Y:01        /*0000*/                   WARPGROUP.ARRIVE ;
   -:-:-:Y:01        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
   -:-:-:Y:08        /*0020*/                   MUFU.EX2 R13, R2 ;
   -:-:-:Y:08        /*0030*/                   MUFU.EX2 R14, R3 ;
   -:-:-:Y:08        /*0040*/                   MUFU.EX2 R15, R4 ;
   -:-:-:-:02        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
   -:-:-:Y:05        /*0060*/              @P0 BRA `(.L_x_0) ;
   -:-:-:Y:05        /*0070*/                   EXIT ;
"""
    (loop,) = sass.kernel_report(listing, "", pairs_per_step=64 * 128)["loops"]
    (group,) = loop["hgmma_groups"]
    assert (group["window_instructions"], group["window_cycles"], group["window_mufu"]) == (3, 24, 3)
    assert loop["tensor_clocks_per_step"] == 64 and loop["exposed_tensor_clocks_per_step"] == 40
    assert loop["serial_clocks_per_pair"] == pytest.approx((40 + loop["stall_sum"]) / (64 * 128), abs=1e-6)
