//! Frozen features of a checkpoint's teacher backbone (DINO evaluates the
//! teacher), L2-normalised, for k-NN and linear evaluation: the final CLS
//! token by default, or DINO's linear-evaluation variants (CLS tokens of the
//! last blocks, pooled patch tokens), chosen by [`FeatureSpec`].

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut2, Axis};

use crate::backend::{Backend, OpError};
use crate::checkpoint::Checkpoint;
use crate::config::TrainConfig;
use crate::data::layout::contiguous;
use crate::data::{EvalBatches, EvalTransform, Split};
use crate::error::SereError;
use crate::export::Network;
use crate::model::vit::VitActs;
use crate::train::network::SereNet;

/// Which frozen features to take, as DINO's `eval_linear.py` chooses them;
/// also the `sere eval` flags that choose them. The default, the final CLS
/// token, is what DINO's k-NN uses.
///
/// ```
/// use sere_host::eval::features::FeatureSpec;
/// let spec = FeatureSpec { last_blocks: 4, avgpool: true, patch_grid: 0, crop_pct: 1.0 };
/// assert_eq!(spec.dim(128), 5 * 128);
/// assert_eq!(spec.name(), "teacher_cls_last4+avgpool");
/// // The final CLS token and the patch tokens pooled onto 4 x 4 cells.
/// let dense = FeatureSpec { patch_grid: 4, ..FeatureSpec::default() };
/// assert_eq!(dense.dim(64), (1 + 16) * 64);
/// assert_eq!(dense.name(), "teacher_cls+grid4");
/// assert_eq!(FeatureSpec::default().name(), "teacher_cls");
/// let dino_crop = FeatureSpec { crop_pct: 0.875, ..FeatureSpec::default() };
/// assert_eq!(dino_crop.name(), "teacher_cls@crop0.875");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
pub struct FeatureSpec {
    /// Concatenate the CLS tokens of the last N blocks, each through the
    /// final norm (DINO's `--n_last_blocks`; its ViT-S/16 linear probe uses
    /// 4; 1 is the final CLS token alone).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub last_blocks: usize,
    /// Append the mean of the last block's patch tokens (DINO's
    /// `--avgpool_patchtokens`).
    #[arg(long)]
    pub avgpool: bool,
    /// Append the last block's patch tokens average-pooled onto a G x G
    /// grid (PyTorch's `adaptive_avg_pool2d`; G = the patch grid's side
    /// keeps every token): features that keep where things are, as
    /// SERE's dense objective trains them. 0: none. Not a DINO protocol.
    #[arg(long, value_name = "G", default_value_t = 0)]
    pub patch_grid: usize,
    /// Evaluation crop: the centre square keeping this fraction of the
    /// image's shorter side, resized to the training image size (1.0: the
    /// whole centre square; 0.875 is DINO's Resize(256) + CenterCrop(224);
    /// timm's `crop_pct`).
    #[arg(long, value_name = "FRACTION", default_value_t = 1.0)]
    pub crop_pct: f32,
}

impl Default for FeatureSpec {
    fn default() -> Self {
        FeatureSpec {
            last_blocks: 1,
            avgpool: false,
            patch_grid: 0,
            crop_pct: 1.0,
        }
    }
}

impl FeatureSpec {
    /// Feature width for a backbone of width `dim`.
    pub fn dim(&self, dim: usize) -> usize {
        (self.last_blocks + usize::from(self.avgpool) + self.patch_grid * self.patch_grid) * dim
    }

    /// The name reported in the evaluation's JSON line.
    pub fn name(&self) -> String {
        let mut name = String::from("teacher_cls");
        if self.last_blocks != 1 {
            name += &format!("_last{}", self.last_blocks);
        }
        if self.avgpool {
            name += "+avgpool";
        }
        if self.patch_grid > 0 {
            name += &format!("+grid{}", self.patch_grid);
        }
        if self.crop_pct != 1.0 {
            name += &format!("@crop{}", self.crop_pct);
        }
        name
    }

    /// Checks the spec against a backbone of `depth` blocks whose images
    /// make a `side x side` patch grid.
    pub fn check(&self, depth: usize, side: usize) -> Result<(), SereError> {
        if self.patch_grid > side {
            return Err(SereError::Other(format!(
                "--patch-grid {} is finer than the checkpoint's {side} x {side} patch grid; use 1 to {side} (or 0 for none)",
                self.patch_grid
            )));
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return Err(SereError::Other(format!(
                "--crop-pct {}: the centre crop keeps a fraction of the image in (0, 1] \
                 (1 keeps the whole centre square, 0.875 is DINO's 256 -> 224)",
                self.crop_pct
            )));
        }
        if (1..=depth).contains(&self.last_blocks) {
            Ok(())
        } else {
            Err(SereError::Other(format!(
                "--last-blocks {} does not fit the checkpoint's {depth}-block backbone; use 1 to {depth}",
                self.last_blocks
            )))
        }
    }
}

/// A backbone restored from a checkpoint onto a backend, ready to embed
/// images.
pub struct Embedder<B: Backend> {
    be: B,
    net: SereNet,
    params: B::Buf,
    cfg: TrainConfig,
}

impl<B: Backend> Embedder<B> {
    /// Loads the teacher of `ck` (the network the run would be evaluated by)
    /// onto `be`.
    pub fn from_checkpoint(be: B, ck: &Checkpoint) -> Result<Self, SereError> {
        Self::from_checkpoint_network(be, ck, Network::Teacher)
    }

    /// Loads `network` (the teacher or the student) of `ck` onto `be`; a
    /// backbone file (`sere export`'s or timm's, [`crate::import`]) is
    /// loaded as it is, whatever `network` says.
    pub fn from_checkpoint_network(
        be: B,
        ck: &Checkpoint,
        network: Network,
    ) -> Result<Self, SereError> {
        if crate::import::is_backbone(ck) {
            // An exported or timm backbone is one network already.
            let cfg = crate::import::backbone_config(ck)?;
            let net = SereNet::new(&cfg);
            let mut host = vec![0.0; net.layout.len()];
            crate::import::read_backbone(ck, &net, &mut host)?;
            return Self::from_params(be, cfg, net, &host);
        }
        let cfg = ck.training_config()?;
        let net = SereNet::new(&cfg);
        let mut host = vec![0.0; net.layout.len()];
        ck.read_params(network.checkpoint_key(), &net.layout, &mut host)?;
        Self::from_params(be, cfg, net, &host)
    }

    /// The network a run of `cfg` starts from (student and teacher are
    /// both this at step 0: the layout's initialisation drawn from
    /// `cfg.seed`, as [`crate::train::engine::Engine::new`] draws it): the
    /// "random initialisation" baseline of a trained teacher.
    pub fn random_init(be: B, cfg: &TrainConfig) -> Result<Self, SereError> {
        use rand::SeedableRng;
        let net = SereNet::new(cfg);
        let mut host = vec![0.0; net.layout.len()];
        net.layout.init(
            &mut host,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed),
        );
        Self::from_params(be, cfg.clone(), net, &host)
    }

    fn from_params(be: B, cfg: TrainConfig, net: SereNet, host: &[f32]) -> Result<Self, SereError> {
        let params = be.upload(host).map_err(device_error)?;
        Ok(Embedder {
            be,
            net,
            params,
            cfg,
        })
    }

    /// Gives the backend back (to load another network onto it).
    pub fn into_backend(self) -> B {
        self.be
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Token width of the backbone.
    pub fn dim(&self) -> usize {
        self.cfg.dim
    }

    /// The backend the backbone runs on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Runs the teacher backbone (no drop-path) on normalised images of
    /// the checkpoint's size, shaped `(n, 3, img, img)` in standard layout
    /// (as [`EvalTransform`] makes them); tokens and attention
    /// probabilities land in `acts` (shaped for `n` images here when
    /// needed). Another shape or layout is an error.
    ///
    /// ```rust
    /// use ndarray::Array4;
    /// use sere_host::backend::Cpu;
    /// use sere_host::config::TrainConfig;
    /// use sere_host::eval::features::Embedder;
    /// let cfg = TrainConfig::default(); // nano, 32 px
    /// let emb = Embedder::random_init(Cpu, &cfg)?;
    /// let mut acts = None;
    /// emb.forward(Array4::zeros((2, 3, cfg.img, cfg.img)).view(), &mut acts)?;
    /// assert!(emb.forward(Array4::zeros((2, 1, cfg.img, cfg.img)).view(), &mut acts).is_err());
    /// # Ok::<(), sere_host::error::SereError>(())
    /// ```
    pub fn forward(
        &self,
        images: ArrayView4<f32>,
        acts: &mut Option<VitActs<B>>,
    ) -> Result<(), SereError> {
        self.backbone().forward(images, acts)
    }

    /// [`Embedder::forward`] on images of side `img` instead of the
    /// checkpoint's: the ViT interpolates its position embedding to the
    /// other grid, as DINO's does, so a larger input gives maps of more
    /// patches. `img` must be a multiple of the patch size (the workspace
    /// panics otherwise; callers check it first, as
    /// [`check_image_size`](crate::visualize::check_image_size) does).
    ///
    /// ```rust
    /// use ndarray::Array4;
    /// use sere_host::backend::Cpu;
    /// use sere_host::config::TrainConfig;
    /// use sere_host::eval::features::Embedder;
    /// let cfg = TrainConfig::default(); // nano, 32 px
    /// let emb = Embedder::random_init(Cpu, &cfg)?;
    /// let img = 2 * cfg.img; // twice the patches a side
    /// emb.forward_at(Array4::zeros((1, 3, img, img)).view(), img, &mut None)?;
    /// # Ok::<(), sere_host::error::SereError>(())
    /// ```
    pub fn forward_at(
        &self,
        images: ArrayView4<f32>,
        img: usize,
        acts: &mut Option<VitActs<B>>,
    ) -> Result<(), SereError> {
        self.backbone().forward_at(images, img, acts)
    }

    /// The backbone as a borrowed [`Backbone`].
    fn backbone(&self) -> Backbone<'_, B> {
        Backbone {
            be: &self.be,
            net: &self.net,
            params: &self.params,
            cfg: &self.cfg,
        }
    }

    /// L2-normalised features (`len x spec.dim(dim)`, a row per image) and
    /// labels of a split, images resized to the training crop size.
    ///
    /// ```rust
    /// use sere_host::backend::Cpu;
    /// use sere_host::data::DataSpec;
    /// use sere_host::eval::features::{Embedder, FeatureSpec};
    /// # let cfg = sere_host::config::TrainConfig { dim: 16, depth: 1, heads: 2, img: 16,
    /// #     local_img: 8, out_dim: 32, head_hidden: 16, bottleneck: 8,
    /// #     ..sere_host::config::TrainConfig::default() };
    /// let emb = Embedder::random_init(Cpu, &cfg)?;
    /// let data = DataSpec::parse("synthetic:size=16,train=6,test=0")?.open()?;
    /// let (f, labels) = emb.embed(&data.train, 4, FeatureSpec::default())?;
    /// assert_eq!(f.dim(), (6, 16));
    /// assert_eq!(labels.len(), 6);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn embed(
        &self,
        split: &Split,
        batch: usize,
        spec: FeatureSpec,
    ) -> Result<(Array2<f32>, Vec<u32>), SereError> {
        self.backbone().embed(split, batch, spec)
    }

    /// L2-normalised features (`n x spec.dim(dim)`) of `n` prepared,
    /// normalised images shaped `(n, 3, S, S)` (standard layout), `acts`
    /// the reusable activations.
    ///
    /// ```rust
    /// use ndarray::Array4;
    /// use sere_host::backend::Cpu;
    /// use sere_host::config::TrainConfig;
    /// use sere_host::eval::features::{Embedder, FeatureSpec};
    /// let cfg = TrainConfig::default(); // nano, 32 px
    /// let emb = Embedder::random_init(Cpu, &cfg)?;
    /// let x = Array4::zeros((3, 3, cfg.img, cfg.img));
    /// let spec = FeatureSpec { avgpool: true, ..FeatureSpec::default() };
    /// let f = emb.features(x.view(), spec, &mut None)?;
    /// assert_eq!(f.dim(), (3, 2 * emb.dim()));
    /// # Ok::<(), sere_host::error::SereError>(())
    /// ```
    pub fn features(
        &self,
        images: ArrayView4<f32>,
        spec: FeatureSpec,
        acts: &mut Option<VitActs<B>>,
    ) -> Result<Array2<f32>, SereError> {
        self.backbone().features(images, spec, acts)
    }

    /// [`Embedder::embed`] saying on stderr how far it got (every tenth of
    /// the split, as `label`), for the commands a person waits on.
    ///
    /// ```rust
    /// use sere_host::backend::Cpu;
    /// use sere_host::data::DataSpec;
    /// use sere_host::eval::features::{Embedder, FeatureSpec};
    /// # let cfg = sere_host::config::TrainConfig { dim: 16, depth: 1, heads: 2, img: 16,
    /// #     local_img: 8, out_dim: 32, head_hidden: 16, bottleneck: 8,
    /// #     ..sere_host::config::TrainConfig::default() };
    /// let emb = Embedder::random_init(Cpu, &cfg)?;
    /// let data = DataSpec::parse("synthetic:size=16,train=3,test=0")?.open()?;
    /// let (f, _) = emb.embed_reporting(&data.train, 2, FeatureSpec::default(), "train")?;
    /// assert_eq!(f.nrows(), 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn embed_reporting(
        &self,
        split: &Split,
        batch: usize,
        spec: FeatureSpec,
        label: &str,
    ) -> Result<(Array2<f32>, Vec<u32>), SereError> {
        self.backbone().embed_inner(split, batch, spec, Some(label))
    }
}

/// A backbone's parameters on a backend, borrowed: an [`Embedder`]'s, or a
/// training engine's teacher between steps (the k-NN of `--eval-every`).
pub struct Backbone<'a, B: Backend> {
    /// The backend the parameters live on.
    pub be: &'a B,
    /// The network's layout.
    pub net: &'a SereNet,
    /// Its parameters (`net.layout.len()` values).
    pub params: &'a B::Buf,
    /// The run's configuration (image size, depth, width).
    pub cfg: &'a TrainConfig,
}

impl<B: Backend> Backbone<'_, B> {
    /// See [`Embedder::forward`].
    pub fn forward(
        &self,
        images: ArrayView4<f32>,
        acts: &mut Option<VitActs<B>>,
    ) -> Result<(), SereError> {
        self.forward_at(images, self.cfg.img, acts)
    }

    /// See [`Embedder::forward_at`]. The one place the eval side's shaped
    /// images become the flat buffer the backend uploads.
    pub fn forward_at(
        &self,
        images: ArrayView4<f32>,
        img: usize,
        acts: &mut Option<VitActs<B>>,
    ) -> Result<(), SereError> {
        let n = check_images(images.dim(), img)?;
        let vit = &self.net.vit;
        vit.prepare_forward(self.be, acts, n, img)
            .map_err(device_error)?;
        let acts = acts
            .as_mut()
            .ok_or_else(|| SereError::Other("the forward pass has no activations".into()))?;
        vit.forward(self.be, self.params, images, acts, None)
            .map_err(device_error)
    }

    /// See [`Embedder::embed`]: `len x spec.dim(dim)` features and labels.
    ///
    /// ```rust
    /// use sere_host::backend::Cpu;
    /// use sere_host::data::DataSpec;
    /// use sere_host::eval::features::{Backbone, FeatureSpec};
    /// use sere_host::train::network::SereNet;
    /// # let cfg = sere_host::config::TrainConfig { dim: 16, depth: 1, heads: 2, img: 16,
    /// #     local_img: 8, out_dim: 32, head_hidden: 16, bottleneck: 8,
    /// #     ..sere_host::config::TrainConfig::default() };
    /// let net = SereNet::new(&cfg);
    /// let params = vec![0.01f32; net.layout.len()];
    /// let backbone = Backbone { be: &Cpu, net: &net, params: &params, cfg: &cfg };
    /// let data = DataSpec::parse("synthetic:size=16,train=5,test=0")?.open()?;
    /// let (f, labels) = backbone.embed(&data.train, 2, FeatureSpec::default())?;
    /// assert_eq!((f.dim(), labels.len()), ((5, 16), 5));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn embed(
        &self,
        split: &Split,
        batch: usize,
        spec: FeatureSpec,
    ) -> Result<(Array2<f32>, Vec<u32>), SereError> {
        self.embed_inner(split, batch, spec, None)
    }

    /// See [`Embedder::features`]: `n x spec.dim(dim)` features.
    ///
    /// ```rust
    /// use sere_host::backend::Cpu;
    /// use sere_host::eval::features::{Backbone, FeatureSpec};
    /// use sere_host::train::network::SereNet;
    /// # let cfg = sere_host::config::TrainConfig { dim: 16, depth: 1, heads: 2, img: 16,
    /// #     local_img: 8, out_dim: 32, head_hidden: 16, bottleneck: 8,
    /// #     ..sere_host::config::TrainConfig::default() };
    /// let net = SereNet::new(&cfg);
    /// let params = vec![0.01f32; net.layout.len()];
    /// let backbone = Backbone { be: &Cpu, net: &net, params: &params, cfg: &cfg };
    /// let x = ndarray::Array4::from_elem((1, 3, 16, 16), 0.1f32);
    /// let f = backbone.features(x.view(), FeatureSpec::default(), &mut None)?;
    /// assert_eq!(f.dim(), (1, 16));
    /// # Ok::<(), sere_host::error::SereError>(())
    /// ```
    pub fn features(
        &self,
        images: ArrayView4<f32>,
        spec: FeatureSpec,
        acts: &mut Option<VitActs<B>>,
    ) -> Result<Array2<f32>, SereError> {
        spec.check(self.cfg.depth, self.cfg.img / self.cfg.patch)?;
        self.forward(images, acts)?;
        let acts = acts
            .as_ref()
            .ok_or_else(|| SereError::Other("the forward pass left no activations".into()))?;
        let f = self
            .net
            .vit
            .eval_features(
                self.be,
                self.params,
                acts,
                spec.last_blocks,
                spec.avgpool,
                spec.patch_grid,
            )
            .map_err(device_error)?;
        let mut f = rows_of(f, spec.dim(self.cfg.dim))?;
        super::knn::l2_normalize_rows(f.view_mut());
        Ok(f)
    }

    fn embed_inner(
        &self,
        split: &Split,
        batch: usize,
        spec: FeatureSpec,
        progress: Option<&str>,
    ) -> Result<(Array2<f32>, Vec<u32>), SereError> {
        spec.check(self.cfg.depth, self.cfg.img / self.cfg.patch)?;
        let started = std::time::Instant::now();
        let mut shown = 0;
        let img = self.cfg.img;
        let mut feats = Vec::with_capacity(split.len() * spec.dim(self.cfg.dim));
        let mut labels = Vec::with_capacity(split.len());
        let mut acts = None;
        let transform = EvalTransform {
            crop_fraction: spec.crop_pct,
            ..EvalTransform::new(img)
        };
        for b in EvalBatches::new(split, transform, batch).map_err(SereError::data)? {
            let b = b.map_err(SereError::data)?;
            let f = self.features(b.images.view(), spec, &mut acts)?;
            feats.extend(f.iter());
            labels.extend_from_slice(&b.labels);
            if let Some(label) = progress {
                let tenth = labels.len() * 10 / split.len().max(1);
                if tenth > shown {
                    shown = tenth;
                    eprintln!(
                        "  {label}: {}/{} images ({}%, {:.1} s)",
                        labels.len(),
                        split.len(),
                        tenth * 10,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
        Ok((rows_of(feats, spec.dim(self.cfg.dim))?, labels))
    }
}

/// `values` as a matrix of rows of `width` (a typed error, not a panic,
/// when they do not fill whole rows).
fn rows_of(values: Vec<f32>, width: usize) -> Result<Array2<f32>, SereError> {
    let rows = values.len().checked_div(width).unwrap_or(0);
    Array2::from_shape_vec((rows, width), values)
        .map_err(|e| SereError::Other(format!("features do not make rows of {width} values: {e}")))
}

/// The image count of an `(n, 3, img, img)` batch, or an error naming the
/// shape the backbone takes (instead of the workspace's panic).
fn check_images(
    (n, c, h, w): (usize, usize, usize, usize),
    img: usize,
) -> Result<usize, SereError> {
    if n == 0 || (c, h, w) != (3, img, img) {
        return Err(SereError::Other(format!(
            "images of shape [{n}, {c}, {h}, {w}]: the backbone takes [n > 0, 3, {img}, {img}]"
        )));
    }
    Ok(n)
}

/// A backend's error while embedding: a kernel's own error, or the device's.
fn device_error(e: OpError) -> SereError {
    match e {
        OpError::Kernel(e) => SereError::Core(e),
        OpError::Device(m) => SereError::Device(format!("CUDA: {m}")),
        OpError::Dist(e) => SereError::Other(e.to_string()),
    }
}

/// Features and their labels, a row per image.
pub type Labelled = (Array2<f32>, Vec<u32>);

/// Raw-pixel features of a split (`len x 3 S^2`, normalised images) and
/// labels: the baseline a learned representation has to beat. Centre them
/// with [`centre_and_normalize`] using the training mean.
///
/// ```rust
/// use sere_host::data::DataSpec;
/// use sere_host::eval::features::pixel_features;
/// let data = DataSpec::parse("synthetic:size=8,train=5,test=0")?.open()?;
/// let (f, labels) = pixel_features(&data.train, 8, 2)?;
/// assert_eq!((f.dim(), labels.len()), ((5, 3 * 8 * 8), 5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn pixel_features(split: &Split, img: usize, batch: usize) -> Result<Labelled, SereError> {
    let mut feats = Vec::with_capacity(split.len() * 3 * img * img);
    let mut labels = Vec::with_capacity(split.len());
    for b in EvalBatches::new(split, EvalTransform::new(img), batch).map_err(SereError::data)? {
        let b = b.map_err(SereError::data)?;
        feats.extend_from_slice(
            contiguous(b.images.view(), "evaluation images").map_err(SereError::data)?,
        );
        labels.extend_from_slice(&b.labels);
    }
    Ok((rows_of(feats, 3 * img * img)?, labels))
}

/// Raw-pixel features of a training and a test split at `img` px, centred
/// with the training mean and L2-normalised, with their labels: the
/// baseline `eval knn --pixels` and `eval linear --pixels` report.
///
/// ```rust
/// use sere_host::data::DataSpec;
/// use sere_host::eval::features::pixel_baseline;
/// let data = DataSpec::parse("synthetic:size=8,train=6,test=3")?.open()?;
/// let test = data.test.as_ref().expect("a test split");
/// let ((tr, trl), (te, tel)) = pixel_baseline(&data.train, test, 8, 4)?;
/// assert_eq!((tr.dim(), te.dim()), ((6, 192), (3, 192)));
/// assert_eq!((trl.len(), tel.len()), (6, 3));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn pixel_baseline(
    train: &Split,
    test: &Split,
    img: usize,
    batch: usize,
) -> Result<(Labelled, Labelled), SereError> {
    let (mut tr, trl) = pixel_features(train, img, batch)?;
    let (mut te, tel) = pixel_features(test, img, batch)?;
    let mean = column_mean(tr.view());
    centre_and_normalize(tr.view_mut(), mean.view())?;
    centre_and_normalize(te.view_mut(), mean.view())?;
    Ok(((tr, trl), (te, tel)))
}

/// Subtracts `mean` (one row) from every row of `feats`, then L2-normalises
/// the rows; a `mean` of another width than the rows is an error.
///
/// ```rust
/// use ndarray::{array, Array2};
/// use sere_host::eval::features::centre_and_normalize;
/// let mut f: Array2<f32> = array![[4.0, 1.0], [1.0, 4.0]];
/// centre_and_normalize(f.view_mut(), array![1.0, 1.0].view())?;
/// assert_eq!(f, array![[1.0, 0.0], [0.0, 1.0]]);
/// assert!(centre_and_normalize(f.view_mut(), array![1.0].view()).is_err());
/// # Ok::<(), sere_host::error::SereError>(())
/// ```
pub fn centre_and_normalize(
    mut feats: ArrayViewMut2<f32>,
    mean: ArrayView1<f32>,
) -> Result<(), SereError> {
    if mean.len() != feats.ncols() {
        return Err(SereError::Other(format!(
            "a mean of {} columns cannot centre features of {}",
            mean.len(),
            feats.ncols()
        )));
    }
    for mut row in feats.rows_mut() {
        for (v, &m) in row.iter_mut().zip(mean) {
            *v -= m;
        }
    }
    super::knn::l2_normalize_rows(feats);
    Ok(())
}

/// Column means of `rows x d` features (summed in f64, row by row).
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::features::column_mean;
/// let m = column_mean(array![[1.0f32, 2.0], [3.0, 6.0]].view());
/// assert_eq!(m, array![2.0, 4.0]);
/// ```
pub fn column_mean(feats: ArrayView2<f32>) -> Array1<f32> {
    let mut mean = vec![0.0f64; feats.ncols()];
    let rows = feats.len_of(Axis(0));
    for row in feats.rows() {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.into_iter()
        .map(|m| (m / rows.max(1) as f64) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::train::engine::CpuEngine;

    /// A grid finer than the patches is refused, naming the range.
    #[test]
    fn a_grid_finer_than_the_patch_grid_is_refused() {
        let fine = FeatureSpec {
            patch_grid: 5,
            ..FeatureSpec::default()
        };
        let e = fine.check(4, 4).unwrap_err().to_string();
        assert!(
            e.contains("--patch-grid 5") && e.contains("use 1 to 4"),
            "{e}"
        );
        let every_token = FeatureSpec {
            patch_grid: 4,
            ..FeatureSpec::default()
        };
        assert!(every_token.check(4, 4).is_ok());
    }

    /// The random-initialisation baseline is the network a run starts
    /// from: the engine's step-0 teacher, bit for bit, for its seed.
    #[test]
    fn random_init_is_the_runs_starting_teacher() {
        let cfg = TrainConfig {
            preset: crate::config::Preset::Custom,
            dim: 16,
            depth: 1,
            heads: 2,
            img: 16,
            local_img: 8,
            out_dim: 32,
            head_hidden: 16,
            bottleneck: 8,
            seed: 5,
            ..TrainConfig::default()
        };
        let emb = Embedder::random_init(Cpu, &cfg).unwrap();
        assert_eq!(emb.params, CpuEngine::cpu(&cfg).teacher);
        let other = Embedder::random_init(Cpu, &TrainConfig { seed: 6, ..cfg }).unwrap();
        assert_ne!(other.params, emb.params);
    }
}
