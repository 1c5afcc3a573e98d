"""mdgen: user-conditioned micro-Doppler spectrogram generation (VA-VAE latents + LightningDiT).

The package is a set of plain modules, one per concern (see README "Package map"). Importing the
package is cheap: heavy modules (torch models, accelerate) load only when a submodule is imported.
"""

__version__ = "0.1.0"
