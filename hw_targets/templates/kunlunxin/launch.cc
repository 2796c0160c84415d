qmsim::begin_kernel({${pipes}});
xpu::active_cores() = ${name}::ACTIVE;
xpu::check_lm(${name}::LM_USED, "${name}");
// ${name}::kernel<<<${clusters}, ${per_cluster}>>>(${args})
for (int cluster = 0; cluster < ${clusters}; ++cluster) {
  for (int core = 0; core < ${per_cluster}; ++core) {
    xpu::enter(cluster, core);
    qmsim::core_begin(cluster * ${per_cluster} + core);
    ${name}::kernel(${args});
    qmsim::core_end();
  }
}
