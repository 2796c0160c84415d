qmsim::begin_kernel({${pipes}});
AscendC::l2_reuse().clear();${reuse}
for (int core = 0; core < ${cores}; ++core) {
  AscendC::qm_begin_core(core, ${cores});
  qmsim::core_begin(core);
  ${name}::${name}_custom(${pointers});
  qmsim::core_end();
}
