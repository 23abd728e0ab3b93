// protsae annotate, one shard of one FASTA per task (nf-core module conventions: meta map, task.ext.args,
// task.ext.prefix, versions.yml, stub). Every shard task reads the whole FASTA and keeps the records with
// ordinal % n_shards == shard-1 (`--shard i/n`), so nothing is split or staged twice and ordinals stay global;
// PROTSAE_MERGE reassembles the input order. See docs/PIPELINES.md.
//
// No --resume here: Nextflow gives every attempt a fresh work directory, so a retried task could never find
// the chunks an earlier attempt saved.
process PROTSAE_ANNOTATE {
    tag "${meta.id} ${meta.shard}/${meta.n_shards}"
    label 'process_high'

    conda "${moduleDir}/environment.yml"
    container 'protsae:0.1.0-cpu'

    input:
    tuple val(meta), path(fasta)
    path sae
    path model

    output:
    tuple val(meta), path("${prefix}.h5"), emit: h5
    path "versions.yml", emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}.${meta.shard}-of-${meta.n_shards}"
    def shard_arg = meta.n_shards > 1 ? "--shard ${meta.shard}/${meta.n_shards}" : ''
    def sae_arg = sae ? "--sae ${sae}" : ''
    def model_arg = model ? "--model ./${model}" : ''
    """
    protsae annotate \\
        ${fasta} \\
        -o ${prefix} \\
        --formats h5 \\
        ${shard_arg} \\
        --threads ${task.cpus} \\
        --no-progress \\
        ${sae_arg} \\
        ${model_arg} \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        protsae: \$(protsae --version)
    END_VERSIONS
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}.${meta.shard}-of-${meta.n_shards}"
    """
    touch ${prefix}.h5

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        protsae: \$(protsae --version)
    END_VERSIONS
    """
}
