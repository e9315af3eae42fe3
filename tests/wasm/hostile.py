"""Test engines written in WebAssembly text: they speak the engine ABI but misbehave on cue.

`wp_run` reads the first input value (the MLP input, FP32): 999 → loops forever; 777 → grows memory until the
limit refuses, then reports out of memory; anything else → zeros for an MLP with OUT outputs (+ probabilities), and
the status `run_status` (0: success; -4, "bad input": an engine that refuses every batch, the warm-up's included).
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

LOOP, HOG = 999.0, 777.0
OUT = 3  # the MLP these engines stand in for has 3 outputs and a softmax: 2 x 3 floats per row

_ABI = """
  (global $top (mut i32) (i32.const 4096))
  (func (export "_initialize"))
  (func (export "wp_abi_version") (result i32) (i32.const {abi}))
  (func (export "wp_alloc") (param $n i32) (result i32)
    (local $p i32) (local $need i32)
    (local.set $p (global.get $top))
    (global.set $top (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 15)) (i32.const -16)))
    (local.set $need (i32.sub (global.get $top) (i32.mul (memory.size) (i32.const 65536))))
    (if (i32.gt_s (local.get $need) (i32.const 0))
      (then (if (i32.eq (memory.grow (i32.add (i32.shr_u (local.get $need) (i32.const 16)) (i32.const 1)))
                        (i32.const -1))
              (then (return (i32.const 0))))))
    (local.get $p))
  (func (export "wp_free") (param i32))
  (func (export "wp_error") (result i32) (i32.const 16))
  (data (i32.const 16) "hostile test engine: out of memory\\00")
  (func (export "wp_init") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "wp_set_tensor") (param i32 i32 i32 i32 i32) (result i32) (i32.const 0))
  (func (export "wp_ready") (result i32) (i32.const 0))
  (func (export "wp_run") (param $b i32) (param $s i32) (param $in i32) (param $out i32) (result i32)
    (if (f32.eq (f32.load (local.get $in)) (f32.const {loop}))
      (then (loop $forever (br $forever))))
    (if (f32.eq (f32.load (local.get $in)) (f32.const {hog}))
      (then
        (block $refused (loop $grow
          (br_if $refused (i32.eq (memory.grow (i32.const 256)) (i32.const -1)))
          (br $grow)))
        (return (i32.const -2))))
    (memory.fill (local.get $out) (i32.const 0) (i32.mul (local.get $b) (i32.const {row_bytes})))
    (i32.const {run_status}))
"""


def hostile_wat(*, pages: int = 2, abi: int = 1, imports: str = "", run_status: int = 0) -> str:
    body = _ABI.format(abi=abi, loop=LOOP, hog=HOG, row_bytes=2 * OUT * 4, run_status=run_status)
    return f'(module {imports}\n  (memory (export "memory") {pages})\n{body})'


def write_engine(path: Path, *, pages: int = 2, abi: int = 1, imports: str = "", run_status: int = 0) -> Path:
    wat = hostile_wat(pages=pages, abi=abi, imports=imports, run_status=run_status)
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path
