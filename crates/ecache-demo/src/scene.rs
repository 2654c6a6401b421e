//! Seeded synthetic scenes: two to five objects on a textured background, one per cell of
//! a 3 x 3 grid, each with a shape, a colour and a size; unique (colour, shape) pairs so
//! that "where is the red circle ?" has one answer.

use ecache_model::generate::SeededRng;
use image::{Rgb, RgbImage};

/// Side of a rendered scene in pixels.
pub const IMAGE_SIDE: u32 = 72;
const CELL: i32 = IMAGE_SIDE as i32 / 3;

/// Object shapes.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];
/// Object colours and their RGB values.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [50, 90, 235]),
    ("yellow", [230, 210, 40]),
    ("purple", [150, 60, 200]),
    ("white", [235, 235, 235]),
];
/// Object sizes.
pub const SIZES: [&str; 2] = ["small", "large"];
/// Cell names in reading order: a row word and a column word each, so that a cell is found
/// by matching both words (with the bare names "top", "left", "center" a question about
/// "top" would have had to rule out "top left" and "top right"; docs/demo.md).
pub const CELLS: [&str; 9] = [
    "top left",
    "top center",
    "top right",
    "middle left",
    "middle center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
];

/// One object: indices into [`SHAPES`], [`COLOURS`], [`SIZES`] and [`CELLS`], and the
/// pixel jitter of its centre.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    pub shape: usize,
    pub colour: usize,
    pub size: usize,
    pub cell: usize,
    jitter: (i32, i32),
    tint: [i8; 3],
}

impl Object {
    /// "large red circle".
    pub fn noun_phrase(&self) -> String {
        format!(
            "{} {} {}",
            SIZES[self.size], COLOURS[self.colour].0, SHAPES[self.shape]
        )
    }
}

/// A scene: objects sorted by cell (reading order), and the seed of its background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub objects: Vec<Object>,
    texture_seed: u64,
}

fn below(rng: &mut SeededRng, n: usize) -> usize {
    ((rng.next_f64() * n as f64) as usize).min(n - 1)
}

impl Scene {
    /// Draws a scene.
    pub fn generate(rng: &mut SeededRng) -> Self {
        let count = 2 + below(rng, 4);
        let mut cells: Vec<usize> = (0..9).collect();
        for i in 0..9 {
            cells.swap(i, i + below(rng, 9 - i));
        }
        let mut cells = cells[..count].to_vec();
        cells.sort_unstable();
        let mut objects: Vec<Object> = Vec::with_capacity(count);
        for cell in cells {
            let (shape, colour) = loop {
                let pair = (below(rng, SHAPES.len()), below(rng, COLOURS.len()));
                if !objects.iter().any(|o| (o.shape, o.colour) == pair) {
                    break pair;
                }
            };
            let mut jitter = || below(rng, 5) as i32 - 2;
            let jitter = (jitter(), jitter());
            let mut tint = [0i8; 3];
            for t in &mut tint {
                *t = below(rng, 31) as i8 - 15;
            }
            objects.push(Object {
                shape,
                colour,
                size: below(rng, 2),
                cell,
                jitter,
                tint,
            });
        }
        Self {
            objects,
            texture_seed: (rng.next_f64() * u32::MAX as f64) as u64,
        }
    }

    /// The object in `cell`, if any.
    pub fn at(&self, cell: usize) -> Option<&Object> {
        self.objects.iter().find(|o| o.cell == cell)
    }

    /// Renders the scene: a noisy dark background with a faint diagonal gradient, then the
    /// objects.
    pub fn render(&self) -> RgbImage {
        let mut rng = SeededRng::new(self.texture_seed);
        let mut image = RgbImage::from_fn(IMAGE_SIDE, IMAGE_SIDE, |x, y| {
            let base = 36.0 + 14.0 * (x + y) as f64 / (2 * IMAGE_SIDE) as f64;
            let mut noise = || (base + rng.next_f64() * 16.0 - 8.0) as u8;
            Rgb([noise(), noise(), noise()])
        });
        for o in &self.objects {
            let cx = (o.cell % 3) as i32 * CELL + CELL / 2 + o.jitter.0;
            let cy = (o.cell / 3) as i32 * CELL + CELL / 2 + o.jitter.1;
            let r = if o.size == 1 { 9 } else { 5 };
            let colour = COLOURS[o.colour].1;
            let pixel =
                Rgb([0, 1, 2].map(|c| (colour[c] as i32 + o.tint[c] as i32).clamp(0, 255) as u8));
            for dy in -r..=r {
                for dx in -r..=r {
                    if inside(o.shape, dx, dy, r) {
                        let (x, y) = (cx + dx, cy + dy);
                        if (0..IMAGE_SIDE as i32).contains(&x)
                            && (0..IMAGE_SIDE as i32).contains(&y)
                        {
                            image.put_pixel(x as u32, y as u32, pixel);
                        }
                    }
                }
            }
        }
        image
    }
}

fn inside(shape: usize, dx: i32, dy: i32, r: i32) -> bool {
    match SHAPES[shape] {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => dx.abs() * 5 <= r * 4 && dy.abs() * 5 <= r * 4,
        // Apex up: the half-width grows from 0 at the top to r at the bottom.
        "triangle" => dy >= -r && dy <= r && 2 * dx.abs() <= dy + r,
        _ => dx.abs() + dy.abs() <= r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_seeded_and_well_formed() {
        let a: Vec<Scene> = {
            let mut rng = SeededRng::new(5);
            (0..200).map(|_| Scene::generate(&mut rng)).collect()
        };
        let mut rng = SeededRng::new(5);
        assert!(a.iter().all(|s| *s == Scene::generate(&mut rng)));
        for s in &a {
            assert!((2..=5).contains(&s.objects.len()));
            assert!(s.objects.windows(2).all(|w| w[0].cell < w[1].cell));
            let mut pairs: Vec<_> = s.objects.iter().map(|o| (o.shape, o.colour)).collect();
            pairs.sort_unstable();
            pairs.dedup();
            assert_eq!(pairs.len(), s.objects.len(), "unique (shape, colour)");
        }
        let counts: Vec<usize> = (2..=5)
            .map(|n| a.iter().filter(|s| s.objects.len() == n).count())
            .collect();
        assert!(counts.iter().all(|&c| c > 25), "{counts:?}");
    }

    #[test]
    fn rendering_puts_each_colour_at_its_cell() {
        let mut rng = SeededRng::new(8);
        for _ in 0..20 {
            let s = Scene::generate(&mut rng);
            let image = s.render();
            for o in &s.objects {
                let cx = (o.cell % 3) as i32 * CELL + CELL / 2 + o.jitter.0;
                let cy = (o.cell / 3) as i32 * CELL + CELL / 2 + o.jitter.1 + 1;
                let p = image.get_pixel(cx as u32, cy as u32).0;
                let want = COLOURS[o.colour].1;
                let close = (0..3).all(|c| (p[c] as i32 - want[c] as i32).abs() <= 15);
                assert!(close, "{} at {}: {p:?}", o.noun_phrase(), CELLS[o.cell]);
            }
        }
    }
}
