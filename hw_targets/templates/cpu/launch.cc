qmsim::begin_kernel({${pipes}});
for (int core = 0; core < ${cores}; ++core) {
  cpu::local().reset();
  qmsim::core_begin(core);
  ${name}::kernel(core, ${cores}, ${args});
  qmsim::core_end();
}
