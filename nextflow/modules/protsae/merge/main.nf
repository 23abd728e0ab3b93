// protsae merge: the HDF5 shards of one input back into one output set, in input order; TSV and GFF3 are
// regenerated from the merged data, so they equal an unsharded run's. Formats come with task.ext.args
// (e.g. "--formats h5,tsv"); each output is optional for that reason.
process PROTSAE_MERGE {
    tag "${meta.id}"
    label 'process_single'

    conda "${moduleDir}/environment.yml"
    container 'protsae:0.1.0-cpu'

    input:
    tuple val(meta), path(shards, stageAs: 'shards/*')

    output:
    tuple val(meta), path("${prefix}.h5"), emit: h5, optional: true
    tuple val(meta), path("${prefix}.tsv"), emit: tsv, optional: true
    tuple val(meta), path("${prefix}.gff3"), emit: gff3, optional: true
    path "versions.yml", emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    protsae merge \\
        ${prefix} \\
        ${shards} \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        protsae: \$(protsae --version)
    END_VERSIONS
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}.h5 ${prefix}.tsv ${prefix}.gff3

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        protsae: \$(protsae --version)
    END_VERSIONS
    """
}
