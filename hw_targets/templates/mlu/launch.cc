qmsim::begin_kernel({${pipes}});
bang::bind(${name}::nram_buffer, sizeof(${name}::nram_buffer), ${wram});
for (int task = 0; task < ${name}::kTaskDim; ++task) {
  bang::start_task(task, ${name}::kTaskDim);
  qmsim::core_begin(task);
  ${name}::kernel(${args});
  qmsim::core_end();
}
