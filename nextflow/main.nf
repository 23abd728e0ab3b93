#!/usr/bin/env nextflow
// protsae on Nextflow: shard one protein FASTA by input ordinal, annotate each shard as its own task, merge.
//
//   nextflow run nextflow/ --input proteins.fasta --n_shards 4 -profile docker
//   nextflow run nextflow/ --input proteins.fasta --sae saes/my_sae --model esm2_t33_650M_UR50D.pt -profile apptainer,gpu
//
// Settings and profiles are in nextflow.config; the modules in modules/protsae/ follow nf-core's conventions
// and can be copied into an nf-core pipeline as they are. See docs/PIPELINES.md.

include { PROTSAE_ANNOTATE } from './modules/protsae/annotate/main'
include { PROTSAE_MERGE } from './modules/protsae/merge/main'

workflow {
    if (!params.input) {
        error "protsae: give the protein FASTA with --input PATH"
    }
    def n_shards = params.n_shards as int
    if (n_shards < 1) {
        error "protsae: --n_shards must be at least 1, got ${params.n_shards}"
    }

    ch_fasta = Channel
        .fromPath(params.input, checkIfExists: true)
        .map { fasta -> [ [ id: params.prefix ?: fasta.simpleName ], fasta ] }

    // One task per (input, shard): every task reads the whole FASTA and keeps its own ordinals (--shard i/n).
    ch_shards = ch_fasta
        .combine(Channel.of(1..n_shards))
        .map { meta, fasta, shard -> [ meta + [ shard: shard, n_shards: n_shards ], fasta ] }

    sae = params.sae ? file(params.sae, checkIfExists: true) : []
    model = params.model ? file(params.model, checkIfExists: true) : []

    PROTSAE_ANNOTATE(ch_shards, sae, model)

    // All shards of one input, in shard order, to one merge task (merge orders by ordinal anyway).
    ch_merge = PROTSAE_ANNOTATE.out.h5
        .map { meta, h5 -> [ [ id: meta.id ], meta.shard, h5 ] }
        .groupTuple(size: n_shards)
        .map { meta, shards, files -> [ meta, [ shards, files ].transpose().sort { it[0] }.collect { it[1] } ] }

    PROTSAE_MERGE(ch_merge)
}
